"""One place checks every config value, from presets, --set and config.json alike."""
import json

import pytest

from exocortex.config import BUDGETS, check_budget, load_config, make_config, save_config
from exocortex.errors import ExocortexError


def test_choices_are_checked_wherever_they_come_from(tmp_path):
    for bad in ("data.packing=zigzag", "pretrain.dtype=fp8", "sft.parallel=tp", "logging.tensorboard=maybe"):
        with pytest.raises(ExocortexError, match="expected one of"):
            make_config("tiny", [bad])
    cfg = make_config("tiny", name="r")
    cfg.runs_dir = str(tmp_path)
    save_config(cfg)
    raw = json.loads((tmp_path / "r" / "config.json").read_text())
    raw["pretrain"]["dtype"] = "fp8"
    (tmp_path / "r" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ExocortexError, match="pretrain.dtype"):
        load_config(tmp_path / "r")


def test_mixtures_are_dicts_on_disk_and_name_weight_pairs_on_the_command_line(tmp_path):
    cfg = make_config("tiny", ["sft_data.mixture=arithmetic=3,facts=1", "eval.chat_tasks=arithmetic=5"], name="r")
    assert cfg.sft_data.mixture == {"arithmetic": 3.0, "facts": 1.0} and cfg.eval.chat_tasks == {"arithmetic": 5}
    cfg.runs_dir = str(tmp_path)
    save_config(cfg)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["sft_data"]["mixture"] == {"arithmetic": 3.0,
                                                                                               "facts": 1.0}
    assert load_config(tmp_path / "r").sft_data.mixture == cfg.sft_data.mixture
    for bad in ("arithmetic=lots", "arithmetic=-1", "=", ""):
        with pytest.raises(ExocortexError, match="sft_data.mixture"):
            make_config("tiny", [f"sft_data.mixture={bad}"])


def test_config_json_unknown_keys_and_wrong_types_are_errors(tmp_path):
    cfg = make_config("tiny", name="r")
    cfg.runs_dir = str(tmp_path)
    path = save_config(cfg)
    good = json.loads(path.read_text())
    cases = [({**good, "surprise": 1}, "unknown key 'surprise'"),
             ({**good, "model": {**good["model"], "depht": 3}}, "unknown key 'model.depht'"),
             ({**good, "model": {**good["model"], "depth": "4"}}, "model.depth"),
             ({**good, "model": {**good["model"], "depth": 4.5}}, "model.depth"),
             ({**good, "sft": {**good["sft"], "compile": "yes"}}, "sft.compile"),
             ({**good, "model": [1, 2]}, "model must be a JSON object"),
             ([good], "an array where a JSON object belongs")]
    for raw, needle in cases:
        path.write_text(json.dumps(raw))
        with pytest.raises(ExocortexError, match=needle):
            load_config(tmp_path / "r")
    # nested deeper than the parser's stack: a RecursionError inside json, not a JSONDecodeError
    for text, needle in [(b"\xff\xfe not utf-8", "not UTF-8"), (b'{"model": ', "not valid JSON"),
                         (b"[" * 100_000, "nested too deeply"), (b'{"a":' * 100_000, "nested too deeply")]:
        path.write_bytes(text)
        with pytest.raises(ExocortexError, match=f"cannot read .*config.json \\({needle}.*; restore it"):
            load_config(tmp_path / "r")


def test_values_out_of_range_are_errors_not_tracebacks():
    for bad in ("model.head_dim=0", "model.depth=0", "pretrain.matrix_lr=-0.1", "sft.device_batch=0",
                "data.val_fraction=1.5", "model.seq_len=1"):
        with pytest.raises(ExocortexError):
            make_config("tiny", [bad])


def test_vocab_size_has_one_home():
    with pytest.raises(ExocortexError, match="tokenizer.vocab_size"):
        make_config("tiny", ["model.vocab_size=1000"])
    assert make_config("tiny", ["tokenizer.vocab_size=2048"]).model.vocab_size == 2048


def test_identity_name_is_one_setting_and_older_runs_keep_theirs(tmp_path):
    assert make_config("tiny", ["identity_name=Ada"]).identity_name == "Ada"
    assert make_config("tiny", ["sft_data.identity_name=Ada"]).identity_name == "Ada"  # the older key
    cfg = make_config("tiny", name="r")
    cfg.runs_dir = str(tmp_path)
    path = save_config(cfg)
    raw = json.loads(path.read_text())
    del raw["identity_name"]
    raw["sft_data"]["identity_name"] = "Old"  # where a run made before this version kept it
    path.write_text(json.dumps(raw))
    assert load_config(tmp_path / "r").identity_name == "Old"


def test_every_preset_passes_its_own_checks():
    from exocortex.config import PRESETS

    for name in PRESETS:
        assert make_config(name).preset == name


def _number_fields():
    """(dotted key, hint) for every number field of every section."""
    from typing import Annotated, get_args, get_origin

    from exocortex.config import config_fields

    for key, hint in config_fields():
        if (get_args(hint)[0] if get_origin(hint) is Annotated else hint) in (int, float):
            yield key, hint


def test_every_number_has_a_range_with_both_ends():
    from typing import Annotated, get_args, get_origin

    from exocortex.config import Range

    keys = list(_number_fields())
    assert len(keys) > 50
    for key, hint in keys:
        assert get_origin(hint) is Annotated and any(isinstance(r, Range) for r in get_args(hint)[1:]), key


def test_nan_inf_huge_and_words_are_rejected_for_every_number():
    """One line naming the key and the allowed range, for every number field (model.vocab_size follows the
    tokenizer's and is refused for that reason)."""
    n = 0
    for key, _ in _number_fields():
        for bad in ("nan", "inf", "-inf", "1e400", str(10**30), "", "abc", "1.5.2", "true"):
            with pytest.raises(ExocortexError, match=f"^{key}"):
                make_config("tiny", [f"{key}={bad}"])
            n += 1
    assert n > 400


def test_range_errors_name_key_value_and_range():
    for bad, needle in [("model.depth=0", "model.depth=0: must be between 1 and 1024"),
                        ("pretrain.matrix_lr=-0.1", "pretrain.matrix_lr=-0.1: must be between 0 and 10"),
                        ("seed=-1", "seed=-1: must be between 0 and 4294967295"),
                        ("tokenizer.vocab_size=100", "tokenizer.vocab_size=100: must be between 267"),
                        ("device=tpu", "device='tpu': expected auto, cpu, mps, cuda or cuda:N"),
                        ("sft_data.mixture=a=nan", "sft_data.mixture"),
                        ("midtrain_data.mixture=a=0,b=0", "midtrain_data.mixture"),
                        ("identity_name=a\nb", "identity_name")]:
        with pytest.raises(ExocortexError) as e:
            make_config("tiny", [bad])
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_stage_without_a_budget_is_refused_by_that_stage_alone(tmp_path):
    """The stage checks its budget when it starts (tests/test_fuzz.py: before it writes anything); loading the
    run does not, so chat, serve and export still read a run whose rl, say, has none."""
    for stage, bad in (("pretrain", ["pretrain.time_minutes=0"]), ("rl", ["rl.time_minutes=0"]),
                       ("sft", ["sft.time_minutes=0", "sft.epochs=0"])):
        cfg = make_config("tiny", bad, name="r")
        with pytest.raises(ExocortexError, match=f"^{stage} has no budget: set one of {stage}\\."):
            check_budget(cfg, stage)
        for other in BUDGETS.keys() - {stage}:
            check_budget(cfg, other)
        cfg.runs_dir = str(tmp_path)
        save_config(cfg)
        assert load_config(tmp_path / "r").to_dict() == cfg.to_dict()
    check_budget(cfg, "eval")  # nothing to check
    assert make_config("tiny", ["pretrain.time_minutes=0", "pretrain.max_steps=5"]).pretrain.max_steps == 5


def test_min_vocab_matches_the_tokenizer():
    from exocortex.config import MIN_VOCAB
    from exocortex.tokenizer import SPECIAL_TOKENS

    assert MIN_VOCAB == 256 + len(SPECIAL_TOKENS)


def test_config_json_nan_and_out_of_range_values_are_errors(tmp_path):
    cfg = make_config("tiny", name="r")
    cfg.runs_dir = str(tmp_path)
    path = save_config(cfg)
    good = json.loads(path.read_text())
    for section, key, value in [("model", "depth", float("nan")), ("pretrain", "matrix_lr", float("inf")),
                                ("model", "depth", 0), ("rl", "seed", -3)]:
        path.write_text(json.dumps({**good, section: {**good[section], key: value}}))
        with pytest.raises(ExocortexError, match=f"{section}.{key}"):
            load_config(tmp_path / "r")


def test_where_a_run_lives_comes_from_flags_not_set(tmp_path):
    """--set name=x on an existing run would send the next stage's files into another run directory."""
    cfg = make_config("tiny", name="r")
    cfg.runs_dir = str(tmp_path)
    save_config(cfg)
    for key, flag in (("name", "--run"), ("runs_dir", "--runs-dir"), ("preset", "--preset")):
        with pytest.raises(ExocortexError, match=f"use {flag} x"):
            load_config(tmp_path / "r", [f"{key}=x"])


def test_paths_set_on_the_command_line_must_exist(tmp_path):
    for key in ("data.path", "eval.core_bundle"):
        with pytest.raises(ExocortexError, match=f"{key}='/no/such/place': no such file or directory"):
            make_config("tiny", [f"{key}=/no/such/place"])
    assert make_config("tiny", [f"data.path={tmp_path}"]).data.path == str(tmp_path)
    cfg = make_config("tiny", name="r")  # a saved run whose corpus has moved since still loads
    cfg.runs_dir, cfg.data.path = str(tmp_path), "/moved/away"
    save_config(cfg)
    assert load_config(tmp_path / "r").data.path == "/moved/away"


def test_a_device_this_machine_lacks_is_one_line_where_a_stage_resolves_it(tmp_path):
    """Reading a run never checks its device (a run from a GPU machine exports on a CPU one); resolving it
    does, in one line (tests/test_fuzz.py runs the stages)."""
    import torch

    from exocortex.device import resolve_device

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    cfg = make_config("tiny", ["device=cuda:1"], name="r")
    cfg.runs_dir = str(tmp_path)
    save_config(cfg)
    assert load_config(tmp_path / "r").device == "cuda:1"
    with pytest.raises(ExocortexError, match="^device='cuda:1': .*no CUDA GPU; use --set device=auto"):
        resolve_device("cuda:1")
    assert resolve_device("auto").type == "cpu"
