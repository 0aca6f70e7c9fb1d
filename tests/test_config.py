"""Gin configuration: every shipped config parses, eager one-line validation, run-directory compatibility."""
import dataclasses
import glob
import os

import gin
import pytest

from mhr_jax import config as config_lib
from mhr_jax import optim

REPO = config_lib.REPO_ROOT


def _load(files, bindings=()):
  config_lib.parse_gin(files, list(bindings))
  return config_lib.load_config()


def test_tiny_config_contract(tmp_path):
  cfg = _load(["configs/tiny.gin"], [f"MODEL_DIR = '{tmp_path}'", "TRAIN_STEPS = 7"])
  assert cfg.run.model_dir == str(tmp_path)
  assert cfg.run.train_steps == 7
  assert cfg.run.log_every == 1 and cfg.run.checkpoint_every <= 5
  assert cfg.model.adapter.kind == "mhr" and cfg.model.adapter.routed
  assert (cfg.model.d_model, cfg.model.num_layers) == (32, 2)  # the tiny preset
  assert cfg.data.source == "synthetic" and cfg.data.vocabulary == "byte"
  assert cfg.optimizer.routing_lr == pytest.approx(100 * cfg.optimizer.adapter_lr)
  # The file starts with the command that runs it.
  with open(os.path.join(REPO, "configs/tiny.gin")) as f:
    head = f.read(400)
  assert "python -m mhr_jax.train --gin_file=configs/tiny.gin --gin.MODEL_DIR=" in head


def _configs(*patterns):
  return sorted(os.path.relpath(p, REPO) for pattern in patterns
                for p in glob.glob(os.path.join(REPO, "configs", pattern)))


def _paper_bindings(tmp_path):
  """Required user paths (macros the configs leave at %gin.REQUIRED) point at an empty directory, with a
  Hugging Face base's config.json (T5-XL LM-adapted sizes) where a config reads one."""
  import transformers
  transformers.T5Config(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False).to_json_file(
                            str(tmp_path / "config.json"))
  return [f"{macro} = '{tmp_path}'"
          for macro in ("MODEL_DIR", "DATA_DIR", "HF_CHECKPOINT", "PRETRAIN_DIR", "SUPERNI_DIR")]


def _stage_configs(path, tmp_path):
  """{stage name: (stage, its checked config)} of the experiment config `path` (analysis stages left out)."""
  from mhr_jax.experiment import plan, runner  # pylint: disable=g-import-not-at-top
  exp, configs = runner.plan_stages([path], _paper_bindings(tmp_path))
  return {stage.name: (stage, configs[stage.name][0]) for stage in plan.plan(exp) if stage.kind != "analysis"}


@pytest.mark.parametrize("path", _configs("tiny.gin", "experiments/*.gin", "adapt/tiny.gin"))
def test_every_config_parses(path, tmp_path):
  """Each complete config parses and builds valid dataclasses (data paths stubbed)."""
  bindings = _paper_bindings(tmp_path)
  with open(os.path.join(REPO, path)) as f:
    text = f.read()
  if "Experiment." in text:  # an experiment: every stage's config builds
    configs = _stage_configs(path, tmp_path)
    for stage, cfg in configs.values():
      assert cfg.run.model_dir == stage.directory
    assert {s.kind for s, _ in configs.values()} >= {"train", "adapt"}
  else:
    cfg = _load([path], bindings + ["TRAIN_STEPS = 10"])
    assert cfg.run.train_steps == 10
  if not path.endswith("_common.gin"):  # starts with the command that runs it
    module = "mhr_jax.experiment" if "Experiment." in text else "mhr_jax.train"
    assert f"python -m {module} --gin_file={path}" in text[:1200]


@pytest.mark.parametrize("path", _configs("models/*.gin"))
def test_model_sizes(path, tmp_path):
  cfg = _load(["configs/tiny.gin", path], [f"MODEL_DIR = '{tmp_path}'"])
  name = os.path.basename(path)[:-4]
  if name == "demo":  # the demo's model: the tiny preset, widened
    assert (cfg.model_cfg.preset, cfg.model.d_model, cfg.model.num_layers) == ("tiny", 128, 2)
  else:
    assert cfg.model_cfg.preset == name
  assert cfg.model.d_model >= 32


def test_paper_settings(tmp_path):
  bindings = [f"{m} = '{tmp_path}'" for m in ("MODEL_DIR", "DATA_DIR", "HF_CHECKPOINT")]
  t0 = _load(["configs/experiments/t0_mhr.gin"], bindings)
  assert (t0.model.adapter.kind, t0.model.adapter.rank, t0.model.adapter.n_skills) == ("mhr", 1, 8)
  assert t0.model.adapter.n_splits == 64  # the authors' scripts/pretrain/pretrain_mhr.sh
  assert t0.model.adapter.n_tasks == 313 and not t0.model.adapter.gumbel
  assert t0.model.adapter.targets("decoder/block_3/mlp/wi_1")
  assert (t0.data.input_len, t0.data.target_len, t0.run.train_steps) == (256, 256, 100000)
  assert t0.data.batch_size == 16  # xl-lm-adapt.json: 8 x 2 accumulation steps
  assert (t0.optimizer.adapter_lr, t0.optimizer.routing_lr, t0.optimizer.clip_norm) == (1e-3, 0.1, 1.0)
  assert t0.optimizer.name == "adafactor" and t0.optimizer.warmup_fraction == 0.06
  assert t0.optimizer.adafactor_factoring == "last_two" and not t0.optimizer.adafactor_scale_parameter
  assert t0.data.t0_cap == "authors"
  # The baselines keep Hugging Face's parameter scaling; (IA)^3 and full fine-tuning train at 3e-4.
  t0_lora, t0_ia3, t0_full = (_load([f"configs/experiments/t0_{m}.gin"], bindings) for m in ("lora", "ia3", "full"))
  assert (t0_lora.optimizer.adafactor_scale_parameter, t0_lora.optimizer.adapter_lr) == (True, 1e-3)
  assert (t0_ia3.optimizer.adafactor_scale_parameter, t0_ia3.optimizer.adapter_lr) == (True, 3e-4)
  assert (t0_full.model.adapter.kind, t0_full.optimizer.base_lr, t0_full.optimizer.adafactor_scale_parameter) == (
      "none", 3e-4, True)
  sni = _load(["configs/experiments/superni_mhr.gin"], bindings)
  assert (sni.model.adapter.rank, sni.model.adapter.n_tasks, sni.model.adapter.gumbel) == (16, 756, True)
  assert sni.model.adapter.targets("encoder/block_0/self_attention/k")
  assert not sni.model.adapter.targets("encoder/block_0/mlp/wo")
  assert (sni.data.input_len, sni.data.target_len, sni.loss.label_smoothing) == (1024, 128, 0.1)
  assert sni.data.max_train_instances == 100 and sni.data.input_prompt == "authors"
  # The authors' configs/ni/pretrain.json: AdamW, weight decay 0.01, clip 0.1, 1,500 warmup steps, 25k steps, batch 8.
  assert (sni.optimizer.name, sni.optimizer.weight_decay, sni.optimizer.clip_norm) == ("adamw", 0.01, 0.1)
  assert (sni.optimizer.warmup_steps, sni.run.train_steps, sni.data.batch_size) == (1500, 25000, 8)
  assert optim.warmup_steps(sni.optimizer, sni.run.train_steps) == 1500
  sni_full = _load(["configs/experiments/superni_full.gin"], bindings)
  assert (sni_full.model.adapter.kind, sni_full.optimizer.base_lr) == ("none", 5e-5)
  # Adaptation keeps routing at 0.1 over the general rate: T0 (Adafactor 3e-3, parameter scaling on) and
  # SuperNI (AdamW 1e-3, label smoothing, 32 shots, dev every 40 steps, beam search with 4 beams).
  adapt = bindings + [f"PRETRAIN_DIR = '{tmp_path}'"]
  t0a = _load(["configs/experiments/t0_mhr.gin", "configs/adapt/mhr_z.gin", "configs/adapt/t0.gin"], adapt)
  assert (t0a.optimizer.name, t0a.optimizer.adapter_lr, t0a.optimizer.routing_lr) == ("adafactor", 3e-3, 0.1)
  assert (t0a.run.train_steps, t0a.data.batch_size, t0a.optimizer.clip_norm) == (1000, 8, 1.0)
  assert t0a.optimizer.adafactor_scale_parameter and t0a.optimizer.adafactor_factoring == "last_two"
  snia = _load(["configs/experiments/superni_mhr.gin", "configs/adapt/mhr.gin", "configs/adapt/superni.gin"], adapt)
  assert (snia.optimizer.name, snia.optimizer.adapter_lr, snia.optimizer.routing_lr) == ("adamw", 1e-3, 0.1)
  assert (snia.optimizer.weight_decay, snia.optimizer.clip_norm) == (0.01, 0.1)
  assert optim.warmup_steps(snia.optimizer, snia.run.train_steps) == 60
  assert (snia.adapt.select_metric, snia.adapt.seeds, snia.loss.label_smoothing) == ("rougeL", (13, 42, 58), 0.1)
  assert (snia.adapt.shots, snia.adapt.select_every, snia.adapt.num_beams) == (32, 40, 4)


def _effective(opt_cfg):
  """The OptimizerConfig with the settings of the other optimizer (Adafactor's under AdamW) at defaults."""
  names = [f.name for f in dataclasses.fields(opt_cfg)]
  unused = ([n for n in names if n.startswith("adafactor_")] if opt_cfg.name == "adamw" else ["b1", "b2", "eps"])
  defaults = optim.OptimizerConfig()
  return dataclasses.replace(opt_cfg, **{n: getattr(defaults, n) for n in unused})


def _used_adapter_settings(acfg) -> dict:
  """The AdapterConfig fields its kind uses (a shared LoRA has no heads or routing)."""
  names = ["kind", "target_modules", "rank", "alpha", "init_a"]
  if acfg.routed:
    names += ["n_tasks", "n_skills", "n_splits", "routing", "gumbel", "temperature", "anneal_steps"]
  return {name: getattr(acfg, name) for name in names}


@pytest.mark.parametrize("benchmark", ["t0", "superni"])
def test_experiment_stages_use_the_standalone_paper_settings(benchmark, tmp_path):
  """Each pre-training stage of the paper experiment (gin scope pretrain/<kind>) trains as the standalone
  configs/experiments/<benchmark>_<kind>.gin; adaptation as configs/adapt/<benchmark>.gin; few-shot full
  fine-tuning starts from the multi-task full fine-tune."""
  stages = _stage_configs(f"configs/experiments/{benchmark}.gin", tmp_path)
  gin.clear_config()
  bindings = _paper_bindings(tmp_path)
  kinds = [name.split("/")[1] for name, (s, _) in stages.items() if s.kind == "train" and s.scope != "mu"]
  assert "full" in kinds
  for kind in kinds:
    _, staged = stages[f"pretrain/{kind}"]
    alone = _load([f"configs/experiments/{benchmark}_{kind}.gin"], bindings)
    assert _effective(staged.optimizer) == _effective(alone.optimizer), kind
    assert _used_adapter_settings(staged.model.adapter) == _used_adapter_settings(alone.model.adapter), kind
    assert (staged.run.train_steps, staged.data.batch_size, staged.loss) == (
        alone.run.train_steps, alone.data.batch_size, alone.loss), kind
  adapt = _load([f"configs/experiments/{benchmark}_mhr.gin", "configs/adapt/mhr.gin",
                 f"configs/adapt/{benchmark}.gin"], bindings)
  _, staged = stages["adapt/mhr"]
  assert _effective(staged.optimizer) == _effective(adapt.optimizer) and staged.loss == adapt.loss
  unbatched = lambda a: dataclasses.replace(a, eval_batch_size=None)  # noqa: E731
  assert unbatched(staged.adapt) == unbatched(adapt.adapt)
  full, _ = stages["adapt/full"]
  assert full.after == ("pretrain/full",)
  assert full.settings["run"]["pretrain_dir"] == str(tmp_path / "pretrain" / "full")


def test_methods_select_their_adapter(tmp_path):
  kinds = {}
  for name in ("poly", "mhr", "lora", "private_lora", "ia3", "full"):
    cfg = _load(["configs/tiny.gin", f"configs/methods/{name}.gin"], [f"MODEL_DIR = '{tmp_path}'"])
    kinds[name] = (cfg.model.adapter.kind, cfg.model.adapter.n_splits)
  assert {name: kind for name, (kind, _) in kinds.items()} == {
      "poly": "poly", "mhr": "mhr", "lora": "lora", "private_lora": "private_lora", "ia3": "ia3",
      "full": "none"}
  assert kinds["poly"][1] == 1 and kinds["mhr"][1] == 8  # Poly is MHR with one head


@pytest.mark.parametrize("method, pretrain_method", [
    ("poly", "poly"), ("mhr", "mhr"), ("poly_z", "poly"), ("mhr_z", "mhr"), ("poly_mu", "poly"),
    ("mhr_mu", "mhr"), ("lora", "lora"), ("ia3", "ia3"), ("private_lora", "private_lora"), ("full", "mhr")])
def test_adapt_configs(method, pretrain_method, tmp_path):
  files = ["configs/tiny.gin", f"configs/methods/{pretrain_method}.gin", f"configs/adapt/{method}.gin"]
  cfg = _load(files, [f"MODEL_DIR = '{tmp_path}/a'", f"PRETRAIN_DIR = '{tmp_path}/p'"])
  assert cfg.run.mode == "adapt" and cfg.run.pretrain_dir == f"{tmp_path}/p"
  assert cfg.adapt.method == method.replace("_z", "-z").replace("_mu", "-mu")
  assert cfg.run.train_steps == 1000 and cfg.data.batch_size == 8  # the paper's T0 adaptation
  assert cfg.optimizer.routing_lr == 0.1  # two speeds in adaptation too (the authors' stacked configs)
  if method not in ("lora", "full"):  # full fine-tuning starts from any kind
    with pytest.raises(config_lib.ConfigError, match=r"^AdaptConfig.method=.* adapts an adapter of kind"):
      _load(["configs/tiny.gin", "configs/methods/lora.gin", f"configs/adapt/{method}.gin"],
            [f"MODEL_DIR = '{tmp_path}/a'", f"PRETRAIN_DIR = '{tmp_path}/p'"])


@pytest.mark.parametrize("binding, expected", [
    ("RunConfig.trainsteps = 3", "RunConfig' doesn't have a parameter named 'trainsteps'"),
    ("Nope.x = 3", "No configurable matching 'Nope'"),
    ("MODEL_DIR = /tmp/x", "strings need quotes"),
    ("RunConfig.train_steps = 0", "RunConfig.train_steps=0: must be >= 1"),
    ("AdapterConfig.kind = 'moe'", "adapter.kind='moe'"),
    ("OptimizerConfig.schedule = 'step'", "OptimizerConfig.schedule='step'"),
    ("ModelConfig.overrides = {'d_modle': 8}", "unknown T5Config field(s) ['d_modle']"),
    ("DataConfig.host_input = 'all'", "DataConfig.host_input='all'"),
    ("RunConfig.mode = 'adapt'", "RunConfig.mode='adapt' starts from RunConfig.pretrain_dir"),
    ("RunConfig.init_transform = 'mu'", "RunConfig.init_transform applies to RunConfig.init_run"),
    ("OptimizerConfig.adafactor_factoring = 'all'", "OptimizerConfig.adafactor_factoring='all'"),
    ("DataConfig.t0_cap = 'none'", "DataConfig.t0_cap='none'"),
    ("AdaptConfig.select_metric = 'bleu'", "AdaptConfig.select_metric='bleu'"),
    ("RunConfig.init_checkpoint = 'gs:/b/t5'", "RunConfig.init_checkpoint='gs:/b/t5': a malformed URL"),
    ("DataConfig.data_dir = 'gs:///ni'", "DataConfig.data_dir='gs:///ni': a malformed URL"),
    ("DataConfig.data_dir = 'nope://b/ni'", "DataConfig.data_dir='nope://b/ni': no file system serves nope://"),
    ("RunConfig.init_run = 'memory://b/run'", "RunConfig.init_run='memory://b/run': a run directory (orbax "
                                              "checkpoints) is a local path or a gs:// URL"),
])
def test_bad_values_are_one_line_errors(binding, expected, tmp_path):
  with pytest.raises(config_lib.ConfigError) as info:
    _load(["configs/tiny.gin"], [f"MODEL_DIR = '{tmp_path}'", binding])
  message = str(info.value)
  assert expected in message
  assert "\n" not in message
  if "=" in binding and "MODEL_DIR" not in binding and "overrides" not in binding:
    assert binding.split("=")[0].strip().split(".")[-1] in message  # names the key


def test_missing_model_dir_and_file():
  with pytest.raises(config_lib.ConfigError, match=r"^MODEL_DIR is required: pass --gin.MODEL_DIR="):
    _load(["configs/tiny.gin"])
  with pytest.raises(config_lib.ConfigError, match=r"^--gin_file=configs/nope.gin: not found"):
    _load(["configs/nope.gin"])


def test_search_paths_and_includes(tmp_path):
  (tmp_path / "mine.gin").write_text("include 'configs/tiny.gin'\nRunConfig.log_every = 3\n")
  config_lib.parse_gin(["mine.gin"], [f"MODEL_DIR = '{tmp_path}'"], search_paths=[str(tmp_path)])
  cfg = config_lib.load_config()
  assert cfg.run.log_every == 3 and cfg.model.adapter.kind == "mhr"


def test_check_run_dir(tmp_path):
  saved = _load(["configs/tiny.gin"], [f"MODEL_DIR = '{tmp_path}'"])
  config_lib.write_run_files(saved, config_lib.operative_config())
  record = (tmp_path / config_lib.RUN_RECORD).read_text()
  # Same model, other run settings (steps, logging): compatible.
  config_lib.check_run_dir(str(tmp_path), _load(["configs/tiny.gin"], [
      f"MODEL_DIR = '{tmp_path}'", "TRAIN_STEPS = 99", "RunConfig.log_every = 10"]))
  # A different adapter: refused, naming the key and both values.
  other = _load(["configs/tiny.gin"], [f"MODEL_DIR = '{tmp_path}'", "AdapterConfig.n_splits = 2"])
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.check_run_dir(str(tmp_path), other)
  assert "AdapterConfig.n_splits: saved 4, now 2" in str(info.value)
  assert "\n" not in str(info.value)
  # Comparing only the architecture (a fresh adapter on that run's base) accepts it.
  config_lib.check_run_dir(str(tmp_path), other, architecture_only=True)
  wider = _load(["configs/tiny.gin"], [f"MODEL_DIR = '{tmp_path}'", "ModelConfig.overrides = {'d_ff': 48}"])
  with pytest.raises(config_lib.ConfigError, match="T5Config.d_ff: saved 64, now 48"):
    config_lib.check_run_dir(str(tmp_path), wider, architecture_only=True)
  assert (tmp_path / config_lib.RUN_RECORD).read_text() == record
  # A run directory without the record (another program's, or an older version's) is named as such.
  (tmp_path / config_lib.RUN_RECORD).unlink()
  with pytest.raises(config_lib.ConfigError, match="no run_config.json there"):
    config_lib.check_run_dir(str(tmp_path), saved)


def test_run_record_round_trips(tmp_path):
  """What a later stage reads of a run (its model, its whole config) is what the run was given."""
  cfg = _load(["configs/tiny.gin"], [f"MODEL_DIR = '{tmp_path}/run'", "AdaptConfig.seeds = (1, 2)",
                                     "RunConfig.param_rules = (('.*', 'frozen'),)",
                                     "ModelConfig.overrides = {'d_ff': 48}"])
  config_lib.write_run_files(cfg, "# text\n")
  assert (tmp_path / "run" / "config.gin").read_text() == "# text\n"
  assert config_lib.saved_model_config(str(tmp_path / "run")) == cfg.model
  assert config_lib.saved_adapter_config(str(tmp_path / "run")) == cfg.model.adapter
  moved = str(tmp_path / "moved")
  os.rename(tmp_path / "run", moved)
  again = config_lib.read_run_config(moved)
  assert again.run.model_dir == moved
  assert again == cfg.__class__(**{**cfg.__dict__, "run": cfg.run.__class__(**{**cfg.run.__dict__,
                                                                               "model_dir": moved})})


def test_explicit_settings_win_over_bindings(tmp_path):
  """A stage's own settings, given as arguments, win over the gin files in and out of scope."""
  config_lib.parse_gin(["configs/tiny.gin"], [f"MODEL_DIR = '{tmp_path}'", "pretrain/AdapterConfig.n_splits = 2",
                                              "pretrain/RunConfig.train_steps = 3"])
  with gin.config_scope("pretrain"):
    cfg = config_lib.load_config(adapter={"kind": "poly", "n_splits": 1}, run={"model_dir": str(tmp_path / "p")})
  assert (cfg.model.adapter.kind, cfg.model.adapter.n_splits) == ("poly", 1)
  assert (cfg.run.model_dir, cfg.run.train_steps) == (str(tmp_path / "p"), 3)
  with pytest.raises(ValueError, match="unknown section"):
    config_lib.load_config(adaptor={"kind": "poly"})


def test_heads_that_do_not_divide_the_widths_are_a_config_error(tmp_path):
  with pytest.raises(config_lib.ConfigError) as info:
    _load(["configs/tiny.gin"], [f"MODEL_DIR = '{tmp_path}'", "AdapterConfig.n_splits = 3"])
  assert str(info.value).startswith("adapter.n_splits=3 must divide the widths of every adapted layer; "
                                    "encoder/block_0/self_attention/q has d_in=32, d_out=32")


def test_operative_config_has_one_binding_per_line(tmp_path):
  _load(["configs/tiny.gin"], [f"MODEL_DIR = '{tmp_path}'"])
  text = config_lib.operative_config()
  assert "AdapterConfig.n_splits = 4" in text
  assert "RunConfig.checkpoint_every = 5" in text
  assert max(len(line) for line in text.splitlines()) < 200


def test_to_gin_round_trips_and_scopes_win(tmp_path):
  """A stage's config written by `to_gin` parses back to the same config; scoped bindings win in scope."""
  (tmp_path / "exp.gin").write_text(
      "include 'configs/tiny.gin'\n"
      "pretrain/OptimizerConfig.adapter_lr = 0.5\npretrain/AdapterConfig.n_splits = 2\n"
      "adapt/RunConfig.train_steps = 3\n")
  bindings = [f"MODEL_DIR = '{tmp_path}/run'", "RunConfig.param_rules = (('.*', 'frozen'),)",
              "ModelConfig.overrides = {'d_ff': 48}", "AdaptConfig.seeds = (1, 2)"]
  plain, _ = config_lib.load_run_config([str(tmp_path / "exp.gin")], bindings)
  scoped, text = config_lib.load_run_config([str(tmp_path / "exp.gin")], bindings, scope="pretrain")
  assert (plain.optimizer.adapter_lr, plain.model.adapter.n_splits) == (1e-2, 4)
  assert (scoped.optimizer.adapter_lr, scoped.model.adapter.n_splits) == (0.5, 2)
  assert scoped.run.train_steps == plain.run.train_steps  # another scope's binding does not apply
  (tmp_path / "stage.gin").write_text(text)
  again, _ = config_lib.load_run_config([str(tmp_path / "stage.gin")])
  assert again == scoped
