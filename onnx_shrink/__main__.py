"""``python -m onnx_shrink`` is the ``onnx-shrink`` command."""

import sys

from onnx_shrink.cli import main

sys.exit(main())
