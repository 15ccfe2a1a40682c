"""Files and data: checkpoints and converted models, datasets in their standard formats,
image folders, figures.
"""
