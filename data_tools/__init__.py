"""mmtrain-data: converters from published corpora to mmtrain shards, synthetic data, tokenizers.

Subpackages write the on-disk format defined once in `mmtrain.data.formats`; nothing here
imports `mmtrain.engine` or `mmtrain.models`.
"""


class DataToolError(Exception):
    """A user-facing failure (missing or malformed input file, bad option); the message names it."""
