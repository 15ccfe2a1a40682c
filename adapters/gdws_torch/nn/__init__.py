"""The GDWS layer and operations on a model's tree of modules (replace, pad, fuse), and
normalisation inside the model: what every other part of gdws_torch builds on.
"""
