"""gdws_onnx: the ONNX adapter of gdws-approx.

Rewrites the convolutions of any ONNX model (exported from any framework) as GDWS
subgraphs (``Gather -> depthwise Conv -> 1x1 Conv``), checks the result in onnxruntime,
and exports torch models. Needs ``onnx``; ``check`` needs ``onnxruntime`` and ``export``
torch (both imported only when used).
"""

from gdws_onnx._files import load_model, save_model
from gdws_onnx.graph import ConvNode, conv_nodes
from gdws_onnx.graph_rewrite import METADATA_KEY, rewrite, rewrite_file
from gdws_onnx.runtime import check, random_inputs
from gdws_onnx.torch_export import export

__all__ = [
    "METADATA_KEY",
    "ConvNode",
    "check",
    "conv_nodes",
    "export",
    "load_model",
    "random_inputs",
    "rewrite",
    "rewrite_file",
    "save_model",
]
