"""The data layer: WikiText-2 (TFDS builder), tokenizers, token streams and batches; GLUE."""

from bdiff_jax.data.glue import Example
from bdiff_jax.data.glue import GlueSplit
from bdiff_jax.data.glue import load_split as load_glue_split
from bdiff_jax.data.glue import load_task as load_glue_task
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
    "ByteTokenizer", "Example", "GlueSplit", "Splits", "SplitCounts", "Tokenizer", "TrainBatches",
    "Wikitext2", "WordTokenizer", "eval_blocks", "load_glue_split", "load_glue_task",
    "load_tokenizer", "load_wikitext2", "resolve_tfds_dir", "validate_source_dir",
    "write_synthetic_corpus",
]
