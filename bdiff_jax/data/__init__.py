"""The data layer: WikiText-2 (TFDS builder), tokenizers, token streams and batches (GLUE's
readers are in `bdiff_jax.glue`)."""

from bdiff_jax.data.pipeline import eval_blocks
from bdiff_jax.data.pipeline import load_wikitext2
from bdiff_jax.data.pipeline import resolve_tfds_dir
from bdiff_jax.data.pipeline import SplitCounts
from bdiff_jax.data.pipeline import Splits
from bdiff_jax.data.pipeline import TrainBatches
from bdiff_jax.data.tokenizer import ByteTokenizer
from bdiff_jax.data.tokenizer import load_tokenizer
from bdiff_jax.data.tokenizer import Tokenizer
from bdiff_jax.data.tokenizer import WordTokenizer
from bdiff_jax.data.wikitext2 import validate_source_dir
from bdiff_jax.data.wikitext2 import Wikitext2
from bdiff_jax.data.wikitext2 import write_synthetic_corpus

__all__ = [
    "ByteTokenizer", "Splits", "SplitCounts", "Tokenizer", "TrainBatches",
    "Wikitext2", "WordTokenizer", "eval_blocks",
    "load_tokenizer", "load_wikitext2", "resolve_tfds_dir", "validate_source_dir",
    "write_synthetic_corpus",
]
