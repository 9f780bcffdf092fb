"""Train the small digits CNN and export it to ONNX (the only user of torch in the project).

Reproduce (from the repository root)::

    pip install torch==2.13.0+cpu scikit-learn
    python -m models.digits.train

Contract:
    * Data: scikit-learn's ``load_digits`` (8x8 grayscale, 10 classes), pixels divided by 16
      into [0, 1], split with ``train_test_split(test_size=0.25, random_state=0, stratify=y)``.
    * Training is seeded (``torch.manual_seed(SEED)``, single thread, deterministic
      algorithms) so a rerun gives the same weights on the same torch build.
    * Writes ``digits_cnn.onnx`` (opset 17, input "image" [batch, 1, 8, 8] float32,
      output "logits" [batch, 10]) and ``digits_test.npz`` (keys "image" float32 [N, 1, 8, 8]
      and "labels" int64 [N]) next to this file.
    * BatchNorm is exported unfused (``TrainingMode.PRESERVE`` with the model in eval mode,
      no constant folding), so the ONNX graph keeps BatchNormalization nodes for the
      compiler's own folding passes to work on.

torch is imported only here; nothing at run time or test time needs it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SEED = 0
OPSET = 17


class DigitsCNN(nn.Module):
    """Conv-BN-Relu x2, MaxPool, residual Conv-BN-Relu block, two-layer Gemm head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.res = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv2(self.conv1(x)))
        x = torch.relu(self.res(x) + x)
        return self.head(x)


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, x_test, y_train, y_test); images float32 [N, 1, 8, 8] in [0, 1]."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_tr, x_te, y_tr, y_te


def train(x_tr: np.ndarray, y_tr: np.ndarray, epochs: int) -> DigitsCNN:
    """Adam + cosine schedule, small random shifts as augmentation."""
    torch.manual_seed(SEED)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    xs, ys = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xs), generator=gen)
        total = 0.0
        for start in range(0, len(xs), 64):
            idx = perm[start : start + 64]
            xb = _shift(xs[idx], gen)
            opt.zero_grad()
            loss = loss_fn(model(xb), ys[idx])
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
        sched.step()
        logger.info("epoch %d loss %.4f", epoch, total / len(xs))
    model.eval()
    return model


def _shift(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Randomly roll the batch by up to one pixel in each direction (zero-filled)."""
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    padded = nn.functional.pad(xb, (1, 1, 1, 1))
    return padded[:, :, 1 + dy : 9 + dy, 1 + dx : 9 + dx]


def accuracy(model: DigitsCNN, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def export(model: DigitsCNN, path: Path) -> None:
    """Export with BatchNorm preserved, dynamic batch, one self-contained file."""
    model.eval()
    dummy = torch.zeros(1, 1, 8, 8)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, 8)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    x_tr, x_te, y_tr, y_te = load_split()
    model = train(x_tr, y_tr, args.epochs)
    acc = accuracy(model, x_te, y_te)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    export(model, args.out_dir / "digits_cnn.onnx")
    np.savez_compressed(args.out_dir / "digits_test.npz", image=x_te, labels=y_te)
    print(f"held-out accuracy (torch): {acc:.4f} on {len(y_te)} images")
    print(f"wrote {args.out_dir / 'digits_cnn.onnx'} and {args.out_dir / 'digits_test.npz'}")


if __name__ == "__main__":
    main()
