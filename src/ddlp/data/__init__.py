"""Datasets and data generators.

registry.build_dataset(config, split) is the entry point; the loaders live in balls.py, trees.py
(OBJ3D, preprocessed CLEVRER), clevrer.py, phyre.py, traffic.py, shapes.py and custom.py (your own
folders, videos, arrays). sources.py reads episodes from files, clipset.py turns them into items by
the paper's sampling rules, samples.py writes small trees in every published format.
"""


def batch_frames(batch):
    """The frames of a dataset item or DataLoader batch: a dict's "frames", a tuple's first item,
    or the tensor itself (every dataset here yields one of the three)."""
    if isinstance(batch, dict):
        return batch["frames"]
    return batch[0] if isinstance(batch, (list, tuple)) else batch
