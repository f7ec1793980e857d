"""Candidate scoring, the cross-entropy over candidates, flags, failures and zeroth-order rows of
the GLUE benchmark (bdiff_jax.glue.objectives, glue.encoding, glue.rows, modes.glue)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax.data.bpe_tokenizer import load_bpe_tokenizer
from bdiff_jax.data.tokenizer import WordTokenizer
from bdiff_jax.errors import UserError
from bdiff_jax.glue import encoding as glue_encoding
from bdiff_jax.glue import objectives as classification
from bdiff_jax.glue import prompts as glue_prompts
from bdiff_jax.glue import readers as glue_readers
from bdiff_jax.glue import report as glue_report
from bdiff_jax.glue import rows as glue_rows
from bdiff_jax.models import bind
from bdiff_jax.models.classifier import OPTLM
from bdiff_jax.models.hf_checkpoint import load_opt
from bdiff_jax.models.opt import OPT
from bdiff_jax.modes import glue as glue_mode
from bdiff_jax.optim import update_rule
from bdiff_jax.train.train_state import create_train_state
from bdiff_jax.train.train_step import make_train_step
from configs import glue as glue_config
from tests import helpers

OPT_DIR = os.path.join(helpers.REPO, "tests", "fixtures", "tiny_opt")
SENTENCES = ["a great movie", "a terrible film", "truly wonderful acting", "boring and dull"]


def write_sst2(root, n_train=40, n_dev=12, dev_offset=0):
  """A tiny SST-2-layout TSV pair under root/SST-2 (dev example i is "... number
  {i + dev_offset}": with an offset >= n_train no dev sentence is a train sentence)."""
  os.makedirs(os.path.join(root, "SST-2"), exist_ok=True)
  for split, n, off in (("train", n_train, 0), ("dev", n_dev, dev_offset)):
    with open(os.path.join(root, "SST-2", f"{split}.tsv"), "w", encoding="utf-8") as f:
      f.write("sentence\tlabel\n")
      for i in range(n):
        f.write(f"{SENTENCES[i % 4]} number {i + off} \t{int(i % 4 in (0, 2))}\n")
  return root


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
  return write_sst2(str(tmp_path_factory.mktemp("glue")))


def test_causal_score_is_mean_label_logprob_under_left_padding(sst2):
  split = glue_readers.load_split("SST-2", "dev", sst2).select([1])
  cfg, params = load_opt(OPT_DIR)
  tok = load_bpe_tokenizer(OPT_DIR)
  enc = glue_encoding.encode_split(split, glue_encoding.BPEEncoder(tok), scoring="causal",
                                   seq_len=48)
  batch = {k: jnp.asarray(v) for k, v in enc.items() if k != "labels"}
  got = np.asarray(jax.jit(lambda p, b: classification.CausalPrompt().scores(
      bind(OPTLM(cfg), {"opt": p}, train=False), b))(params, batch))
  log_probs = jax.jit(lambda p, ids: jax.nn.log_softmax(
      OPT(cfg).apply({"params": p}, ids, jnp.ones_like(ids))[0], axis=-1))
  for i in range(len(split)):
    parts = glue_prompts.render("SST-2", split[i])
    for c in range(2):
      ctx = tok.encode(parts.context)  # BOS + context, unpadded
      cont = tok.encode(parts.continuation(c))[1:]
      logp = np.asarray(log_probs(params, jnp.asarray([ctx + cont])))
      want = np.mean([float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)])
      np.testing.assert_allclose(got[i, c], want, rtol=1e-4, atol=1e-4)


def test_cloze_score_is_log_softmax_at_the_mask(sst2):
  split = glue_readers.load_split("SST-2", "dev", sst2).select([0, 1])
  tok = WordTokenizer.from_corpus(["it was terrible great . a movie film", "number 0 1"])
  enc = glue_encoding.encode_split(split, glue_encoding.WordEncoder(tok), scoring="cloze",
                                   seq_len=12)
  assert (enc["inputs"][np.arange(2), enc["mask_pos"]] == tok.mask_id).all()
  assert (enc["candidate_ids"] == [tok.id_of("terrible"), tok.id_of("great")]).all()
  table = jax.random.normal(jax.random.PRNGKey(0), (tok.mask_id + 1, tok.vocab_size))
  apply = lambda tokens, t=None, *, padding_mask=None: table[tokens] * (1 + jnp.arange(
      tokens.shape[1]))[None, :, None]
  batch = {k: jnp.asarray(v) for k, v in enc.items() if k != "labels"}
  got = np.asarray(classification.ClozePrompt(time_conditioned=False).scores(apply, batch))
  for b in range(2):
    logits = np.asarray(apply(batch["inputs"]))[b, enc["mask_pos"][b]]
    logp = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    np.testing.assert_allclose(got[b], logp[enc["candidate_ids"][b]], rtol=1e-5, atol=1e-5)


def test_cloze_score_of_multi_word_candidates_reads_every_token_under_its_masks():
  """COPA's choices are sentences: each candidate gets its own row with one mask per token, and
  its score is the mean log-probability of its tokens there (all masked at once)."""
  from bdiff_jax.glue import tasks as glue_tasks  # pylint: disable=g-import-not-at-top
  texts = (("The man fell.", "It rained."), ("He tripped.", "The grass got wet."),
           ("I laughed.", "The sun was out."), ("cause", "effect"))
  split = glue_tasks.GlueSplit(task="COPA", split="dev", texts=texts,
                               labels=np.array([0, 0]), label_names=("0", "1"),
                               segment_names=glue_tasks.TASKS["COPA"].segment_names,
                               source_rows=np.arange(2), path="")
  tok = WordTokenizer.from_corpus(["the man fell because he tripped i laughed . it rained so "
                                   "grass got wet sun was out"])
  time_of = lambda f: 0.5 + f  # a non-identity map, to see that t is the masked fraction's
  enc = glue_encoding.encode_split(split, glue_encoding.WordEncoder(tok), scoring="cloze",
                                   seq_len=16, time_of_fraction=time_of)
  assert enc["inputs"].shape == enc["targets"].shape == enc["score_mask"].shape == (2, 2, 16)
  # "he tripped .", "I laughed .", "the grass got wet .", "the sun was out ." (punctuation
  # split off as WikiText-2 writes it: the word-level vocabulary has "tripped", not "tripped.")
  lengths = {(0, 0): 3, (0, 1): 3, (1, 0): 5, (1, 1): 5}
  for (b, c), n in lengths.items():
    span = enc["score_mask"][b, c] > 0
    assert span.sum() == n and (enc["inputs"][b, c][span] == tok.mask_id).all()
    assert (enc["inputs"][b, c][~span & enc["padding"][b, c]] != tok.mask_id).all()
    assert enc["t"][b, c] == pytest.approx(time_of(n / enc["padding"][b, c].sum()))
  assert tok.decode(enc["targets"][1, 0][enc["score_mask"][1, 0] > 0]) == "the grass got wet ."
  table = jax.random.normal(jax.random.PRNGKey(0), (tok.mask_id + 1, tok.vocab_size))
  seen_t = []
  def apply(tokens, t=None, *, padding_mask=None):
    seen_t.append(t)
    return table[tokens] * (1 + jnp.arange(tokens.shape[1]))[None, :, None]
  batch = {k: jnp.asarray(v) for k, v in enc.items() if k != "labels"}
  got = np.asarray(classification.ClozePrompt(time_conditioned=True).scores(apply, batch))
  np.testing.assert_allclose(np.asarray(seen_t[-1]), enc["t"].reshape(4), rtol=1e-6)
  for (b, c) in lengths:
    logits = np.asarray(apply(batch["inputs"][b, c][None]))[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                           keepdims=True)) - logits.max(-1, keepdims=True)
    pos = np.flatnonzero(enc["score_mask"][b, c])
    want = np.mean(logp[pos, enc["targets"][b, c][pos]])
    np.testing.assert_allclose(got[b, c], want, rtol=1e-5, atol=1e-5)


def test_word_encoder_splits_unknown_words_as_wikitext_writes_them():
  tok = WordTokenizer.from_corpus(["he tripped . do n't well @-@ known 3 @,@ 000 ( IBM ) 's"])
  enc = glue_encoding.WordEncoder(tok)
  assert glue_encoding.wikitext_pieces('"Hello,"') == ['"', "Hello", ",", '"']
  assert glue_encoding.wikitext_pieces("3.5%") == ["3", "@.@", "5", "%"]
  for text, words in (("He tripped.", "he tripped ."), ("don't", "do n't"),
                      ("well-known", "well @-@ known"), ("3,000", "3 @,@ 000"),
                      ("(IBM)'s", "( IBM ) 's")):
    assert enc.ids(text) == [tok.id_of(w) for w in words.split()], text
  assert enc.stats.unknown == 0
  # A known word is never split; an unknown piece is one <unk>.
  known = WordTokenizer.from_corpus(["e-mail mail"])
  assert glue_encoding.WordEncoder(known).ids("e-mail") == [known.id_of("e-mail")]
  other = glue_encoding.WordEncoder(known)
  assert other.ids("e-mail,") == [known.unk_id, known.unk_id, known.id_of("mail"), known.unk_id]
  assert other.stats.unknown == 3 and other.stats.words == 4


def test_cross_entropy_over_candidates():
  scores = np.array([[0.0, 1.0, -2.0], [3.0, 0.5, 0.5]], np.float32)
  target = np.array([[0, 1, 0], [0.2, 0.3, 0.5]], np.float32)
  logp = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
  want = -np.mean(np.sum(target * logp, -1))
  got = float(classification.soft_cross_entropy(jnp.asarray(scores), jnp.asarray(target)))
  assert got == pytest.approx(want, rel=1e-6)
  # The loss the train step sees is that CE of the scores against batch["target"].
  obj = classification.PooledHead(causal=False, time_conditioned=False)
  loss, aux = obj.loss(lambda x, t=None, *, padding_mask=None: x,
                       {"inputs": jnp.asarray(scores), "padding": None, "target": target}, None)
  assert float(loss) == pytest.approx(want, rel=1e-6)
  assert float(aux["train_accuracy"]) == pytest.approx(0.5)


def test_constant_predictor_and_majority_rows_are_flagged():
  assert "constant predictor" in glue_report.flags([0.9], 0.5, [[1.0, 0.0]])
  assert "at or below majority" in glue_report.flags([0.5, 0.5], 0.5, [[0.6, 0.4]] * 2)
  assert glue_report.flags([0.8, 0.7], 0.5, [[0.5, 0.5], [0.4, 0.6]]) == []


def _config(sst2, rows, **over):
  c = glue_config.get_config("test")
  c.glue.glue_dir = sst2
  c.glue.rows = rows
  for k, v in over.items():
    c.glue[k] = v
  return c


def test_a_failing_row_fails_the_run(sst2, tmp_path):
  c = _config(sst2, "opt:adamw", opt_dir=str(tmp_path / "no_such_opt"))
  with pytest.raises(UserError):
    glue_mode.run(c, str(tmp_path / "w"), helpers_reporter())
  assert not os.path.exists(tmp_path / "w" / "glue.json")


def helpers_reporter():
  from bdiff_jax.runtime.reporter import QUIET  # pylint: disable=g-import-not-at-top
  return QUIET


class _Counting(classification.CausalPrompt):
  """CausalPrompt whose loss counts its executions and cannot be differentiated."""

  def __init__(self, counter):
    super().__init__()
    self.counter = counter

  def loss(self, apply, batch, key):
    jax.debug.callback(lambda: self.counter.append(1))
    loss, aux = super().loss(apply, batch, key)
    return _no_grad(loss), aux


@jax.custom_vjp
def _no_grad(x):
  return x


def _raise_fwd(x):
  return x, None


def _raise_bwd(res, g):
  raise AssertionError("the update rule differentiated the loss")


_no_grad.defvjp(_raise_fwd, _raise_bwd)


@pytest.mark.parametrize("rule", ["mezo", "dizo", "adamw"])
def test_update_rule_forward_passes_and_gradients(sst2, rule):
  g = glue_mode.glue_settings(_config(sst2, f"opt:{rule}"))
  train, _, _, full = glue_mode.task_splits("SST-2", g, 0)
  steps = 3
  row = glue_rows.build_row(glue_rows.parse_rows(g.rows)[0], g, full, seed=0,
                              total_steps=steps)
  enc = glue_encoding.encode_split(train, row.encoder, scoring=row.scoring, seq_len=g.seq_len)
  batch = {k: jnp.asarray(v[:4]) for k, v in enc.items() if k != "labels"}
  n = update_rule.batches_per_step(row.rule)  # DiZO: 1 + iterations (a fresh batch each)
  assert n == (1 + g.dizo.iterations if rule == "dizo" else 1)
  if n > 1:
    batch = {k: jnp.stack([v] * n) for k, v in batch.items()}
  counter = []
  step = make_train_step(_Counting(counter), row.network, row.rule, ema_decay=0.0)
  state = create_train_state(row.params, row.rule, jax.random.PRNGKey(0))
  if rule == "adamw":
    with pytest.raises(AssertionError, match="differentiated"):
      step(state, batch)
    return
  before = jax.tree_util.tree_map(np.asarray, row.params)
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.effects_barrier()
  want = glue_rows.forward_passes(row.rule, steps)
  assert want["backward"] == 0
  expected = 2 * g.zo.num_perturbations * steps + (
      2 * g.dizo.iterations * (steps // g.dizo.interval) if rule == "dizo" else 0)
  assert len(counter) == want["forward"] == expected
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                 state.params, before)
  assert max(jax.tree_util.tree_leaves(moved)) > 0  # the rule did update parameters
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.slow
def test_glue_test_level_end_to_end(sst2, tmp_path):
  c = _config(sst2, glue_config.get_config("test").glue.rows, seeds=(0,))
  out = glue_mode.run(c, str(tmp_path), helpers_reporter())
  rows = {r["row"]: r for r in out["rows"]}
  assert set(rows) == {"adamw_reversible_qwen3", "adamw_standard_qwen3", "mezo_opt",
                       "dizo_opt", "adamw_opt", "adamw_opt_head"}
  for name in ("glue.json", "glue.md", "glue.png"):
    assert os.path.getsize(tmp_path / name) > 0
  steps = c.glue.num_steps
  assert rows["mezo_opt"]["forward_passes"] == {"forward": 2 * steps, "backward": 0}
  assert rows["adamw_opt"]["forward_passes"] == {"forward": steps, "backward": steps}
  assert rows["adamw_reversible_qwen3"]["scoring"] == "cloze"
  assert rows["adamw_opt"]["scoring"] == "causal" and rows["adamw_opt_head"]["scoring"] == "head"
  for r in rows.values():
    assert 0.0 <= r["mean"] <= 1.0 and r["step_memory_bytes"] > 0 and r["params"] > 0
    assert sum(r["prediction_distribution"]) == pytest.approx(1.0)
    constant = max(r["prediction_distribution"]) >= glue_report.CONSTANT_FRACTION
    assert ("constant predictor" in r["flags"]) == constant
  assert rows["adamw_reversible_qwen3"]["oov_rate"] == pytest.approx(0.0)  # train-text vocab
  assert rows["adamw_reversible_qwen3"]["init"].startswith("Qwen3-style (reversible), 0.0 M "
                                                           "parameters (")
  for rec in out["records"]:
    # Every evaluation point of the curve, with its forward passes; step 0 is the zero-shot.
    assert [p["step"] for p in rec["curve"]] == [0, 2, 3]
    assert rec["curve"][-1]["forward"] == rec["forward_passes"]["forward"]
    assert rec["curve"][0]["dev"] == rec["zero_shot"]["dev"]["dev"]["accuracy"]
    assert rec["selected_step"] in (0, 2, 3) and rec["relative_param_change"] >= 0
    assert (rec["selected_step"] == 0) == (rec["relative_param_change"] == 0.0)
    assert rec["sizes"]["selection"] == 8
    # The start probe where the candidates are read at one position: the word-level rows'
    # one-token label words; not a pooled head, nor the BPE fixture's several-token labels.
    if rec["row"].endswith("qwen3"):
      assert rec["start_probe"]["train_examples"] == rec["sizes"]["train"]
      assert 0.0 <= rec["start_probe"]["dev_splits"]["dev"]["accuracy"] <= 1.0
    else:
      assert rec["start_probe"] is None
  assert rows["adamw_opt_head"]["start_probe"] is None
  assert 0.0 <= rows["adamw_reversible_qwen3"]["start_probe"] <= 1.0
  for r in rows.values():
    assert ("selected step 0 (1/1 seeds)" in r["flags"]) == (r["selected_steps"] == [0])
    assert r["bow"] == 1.0  # the toy task is separable by its words
  md = (tmp_path / "glue.md").read_text()
  assert "DiZO vs MeZO at equal forward passes" in md and "step-0 dev" in md
  assert "| start probe |" in md
  assert os.path.getsize(tmp_path / "glue_curves_SST-2.png") > 0


def test_selection_set_is_class_balanced(sst2, tmp_path):
  # 30 positive, 10 negative train examples: a random 8 would mostly be positive.
  root = write_sst2(str(tmp_path / "imb"), n_train=40)
  path = os.path.join(root, "SST-2", "train.tsv")
  lines = open(path, encoding="utf-8").read().splitlines()
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines[:1] + [ln.rsplit("\t", 1)[0] + "\t" + ("0" if i % 4 == 0 else "1")
                                    for i, ln in enumerate(lines[1:])]) + "\n")
  g = glue_mode.glue_settings(_config(root, "opt:mezo"))
  for seed in (0, 1):
    train, selection, devs, _ = glue_mode.task_splits("SST-2", g, seed)
    assert np.bincount(selection.labels).tolist() == [4, 4]
    assert np.bincount(train.labels).tolist() == [4, 4]  # k_per_class=4 of the rest
    assert set(devs) == {"dev"}
  g = glue_mode.with_changes(g, k_per_class=0)  # the full train split minus the selection set
  train, selection, _, full = glue_mode.task_splits("SST-2", g, 0)
  assert len(train) == len(full) - 8 and not set(train.source_rows) & set(selection.source_rows)
  g = glue_mode.with_changes(g, train_examples=10)
  assert len(glue_mode.task_splits("SST-2", g, 0)[0]) == 10


@pytest.mark.parametrize("key,value,match", [
    ("num_steps", 0, "glue.num_steps=0"), ("eval_every", 0, "glue.eval_every"),
    ("batch_size", 0, "glue.batch_size"), ("seeds", (), "glue.seeds"),
    ("k_per_class", -1, "glue.k_per_class"), ("tasks", " ", "glue.tasks"),
    ("selection_fraction", 1.0, "selection_fraction"), ("rows", "opt:sgd", "glue.rows"),
    ("opt_dir", "", "needs glue.opt_dir, and '' is not given"),
    ("opt_dir", "/no/such/opt", "not a directory")])
def test_config_is_validated_up_front(sst2, tmp_path, key, value, match):
  c = _config(sst2, "opt:mezo")
  c.glue[key] = value
  with pytest.raises(UserError, match=match):
    glue_mode.run(c, str(tmp_path), helpers_reporter())
  assert not os.listdir(tmp_path)


def test_opt_dir_has_no_silent_default():
  for level in ("quick", "cpu", "full"):
    g = glue_mode.glue_settings(glue_config.get_config(level))
    assert g.opt_dir == "" and len(g.seeds) >= 3
    if level == "cpu":  # its opt rows start from the OPT model it pretrains under starts_dir
      assert g.starts_dir
      glue_mode.validate(g)
      g = glue_mode.with_changes(g, starts_dir="")
    with pytest.raises(UserError, match="needs glue.opt_dir"):
      glue_mode.validate(g)
  assert glue_config.get_config("test").glue.opt_dir == OPT_DIR


def test_mnli_reports_matched_and_mismatched(tmp_path):
  root = tmp_path / "glue" / "MNLI"
  root.mkdir(parents=True)
  labels = ("entailment", "neutral", "contradiction")
  for split, n in (("train", 30), ("dev_matched", 6), ("dev_mismatched", 9)):
    with open(root / f"{split}.tsv", "w", encoding="utf-8") as f:
      f.write("sentence1\tsentence2\tgold_label\n")
      for i in range(n):
        f.write(f"{SENTENCES[i % 4]} {i}\t{SENTENCES[(i + 1) % 4]}\t{labels[i % 3]}\n")
  c = _config(str(tmp_path / "glue"), "opt:adamw", tasks="MNLI", seeds=(0,), selection=6)
  out = glue_mode.run(c, str(tmp_path / "w"), helpers_reporter())
  assert [r["task"] for r in out["rows"]] == ["MNLI-m", "MNLI-mm"]
  rec = out["records"][0]
  assert set(rec["dev_splits"]) == {"dev_matched", "dev_mismatched"}
  assert rec["sizes"]["dev_matched"] == 6 and rec["sizes"]["dev_mismatched"] == 9
  assert set(rec["zero_shot"]["dev"]) == {"dev_matched", "dev_mismatched"}
  for r, split in zip(out["rows"], ("dev_matched", "dev_mismatched")):
    assert r["values"] == [rec["dev_splits"][split]["accuracy"]]
    assert set(out["baselines"][0]["bow"]) == {"dev_matched", "dev_mismatched"}


def test_seq_len_by_task():
  g = glue_mode.with_changes(glue_mode.glue_settings(glue_config.get_config("test")),
                             seq_len_by_task="sst-2:24")
  assert glue_mode.task_seq_len(g, "SST-2") == 24 and glue_mode.task_seq_len(g, "RTE") == 40
  glue_mode.validate(g)
  for bad in ("SST-2:99", "SST-2", "NOPE:8", "SST-2:x"):
    g = glue_mode.with_changes(g, seq_len_by_task=bad)
    with pytest.raises(UserError, match="seq_len_by_task|unknown GLUE"):
      glue_mode.validate(g)
