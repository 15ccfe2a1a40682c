"""The bottom layer: small mechanisms every other part of gdws_torch uses once.

- :func:`conv_patches`, :func:`conv_patch_rows` (:mod:`.patches`): the input patches a
  convolution multiplies;
- :func:`checked_batches`, :func:`take_samples` (:mod:`.samples`): a loader's batches,
  each checked where it enters (an ``(images, labels, ...)`` structure, finite pixels:
  a clear error naming the stage and the batch), and the first ``n`` samples of a
  loader, or a clear error when it has fewer.

The others live where they belong and are shared from there:
:func:`gdws_torch.nn.module_tree.eval_mode` (a model's train/eval modes saved and
restored), :mod:`gdws_approx.checks` (scalar arguments) and
:func:`gdws_approx.files.atomic_output` (atomic file writes).
"""

from gdws_torch.common.patches import conv_patch_rows, conv_patches
from gdws_torch.common.samples import checked_batches, take_samples

__all__ = ["checked_batches", "conv_patch_rows", "conv_patches", "take_samples"]
