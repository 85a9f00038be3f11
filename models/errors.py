"""The base of every error a model-side check raises; importing it does not import torch.

The CLI catches `ModelError` and prints it as one line, so it must stay importable before
torch is (`querydet --help` never loads torch).
"""


class ModelError(ValueError):
    """Bad input to the model side: a config value, a checkpoint file, weights, an image tensor."""
