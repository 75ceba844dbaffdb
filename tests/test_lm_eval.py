"""lm-evaluation-harness against a live server, offline: the task files are written here, nothing is downloaded.

a. A multiple-choice (loglikelihood) task through lm-eval's `local-completions` model (token-id prompts, echo,
   logprobs, max_tokens 1, several prompts per request) scores what lm-eval's `hf` model scores on the HF export
   of the same checkpoint: the same acc, and the same loglikelihood for every choice of every item.
b. A generate_until task through `local-chat-completions`: lm-eval's generations are the server's greedy replies.

lm-eval runs in a subprocess (its imports read the offline switches from the environment) against uvicorn
serving the run's checkpoint in this process, as `exocortex serve` loads it. A small random-weight model keeps
it quick (about 15 s on 2 cores, most of it imports)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
from test_serve import Server  # noqa: E402

from exocortex.apps.export.hf import export_hf  # noqa: E402
from exocortex.apps.serve import create_app  # noqa: E402
from exocortex.checkpoint import save_checkpoint  # noqa: E402
from exocortex.config import make_config, save_config  # noqa: E402
from exocortex.infer.engine import load_engine  # noqa: E402
from exocortex.model import GPT  # noqa: E402

MODEL = "exo-lm-eval"

# Eight multiple-choice items over the test tokenizer's words (tests/conftest.py); the answers are arbitrary:
# the model is random, what matters is that both ways score every choice alike.
MC = [("Mira lives in", ["Tarsk", "the river", "market", "12"], 0),
      ("Mira sells glimmerfern at", ["the market", "Tarsk", "naïve", "347"], 0),
      ("the river town", ["and Mira", "is 12", "sells 日本", "🙂"], 1),
      ("12 + 347 =", ["359", "12", "Tarsk", "héllo"], 0),
      ("we'll sell", ["glimmerfern", "the town", "in Tarsk", "it's"], 2),
      ("héllo", ["Mira", "naïve", "日本", "river"], 3),
      ("The town of Tarsk", ["lives", "sells at market", "and the river", "12"], 1),
      ("it's in", ["the river town", "Tarsk", "market 347", "🙂 🙂"], 0)]
GEN = [("Where does Mira live?", "Tarsk"), ("What does Mira sell?", "glimmerfern"), ("12 + 347 =", "359"),
       ("Say héllo", "héllo")]

MC_YAML = """\
task: exo_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""

GEN_YAML = """\
task: exo_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""

# The harness's side, run as `python -c DRIVER <config.json>`: one evaluation per entry, results to a file.
DRIVER = textwrap.dedent("""
    import json, sys
    import lm_eval
    from lm_eval.tasks import TaskManager

    cfg = json.load(open(sys.argv[1]))
    tm = TaskManager(include_path=cfg["tasks_dir"], include_defaults=False)
    out = {}
    for name, run in cfg["runs"].items():
        res = lm_eval.simple_evaluate(model=run["model"], model_args=run["model_args"], tasks=[run["task"]],
                                      task_manager=tm, batch_size=run.get("batch_size", 1), log_samples=True,
                                      apply_chat_template=run.get("chat", False), bootstrap_iters=0)
        samples = sorted(res["samples"][run["task"]], key=lambda s: s["doc_id"])
        out[name] = {"metrics": res["results"][run["task"]], "resps": [s["resps"] for s in samples]}
    json.dump(out, open(cfg["out"], "w"))
""")


def _random_gpt(cfg, seed=0):
    """Every weight random (the default init zeroes some), so every position's distribution is its own."""
    model = GPT(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if p.ndim == 1
                    else 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def setup(tok, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    cfg = make_config("tiny", ["model.depth=2", "model.width=64", "model.head_dim=16", "model.mlp_ratio=2.0",
                               "model.seq_len=64", f"tokenizer.vocab_size={tok.vocab_size}", "sft.dtype=float32"],
                      name="lmeval")
    cfg.runs_dir = str(tmp)
    save_config(cfg)
    tok.save(cfg.run_dir / "tokenizer")
    save_checkpoint(cfg.run_dir, "sft", 1, _random_gpt(cfg.model), cfg.model)
    hf_dir = export_hf(cfg.run_dir, tmp / "hf")
    engine = load_engine(cfg, "sft")  # what `exocortex serve` serves
    assert engine.dtype == torch.float32
    server = Server(create_app(engine, MODEL))

    tasks = tmp / "tasks"
    tasks.mkdir()
    mc, gen = tasks / "mc.jsonl", tasks / "gen.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}, ensure_ascii=False) + "\n"
                          for q, c, a in MC))
    gen.write_text("".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) + "\n" for q, a in GEN))
    (tasks / "exo_mc.yaml").write_text(MC_YAML.format(data=json.dumps(str(mc))))
    (tasks / "exo_gen.yaml").write_text(GEN_YAML.format(data=json.dumps(str(gen))))

    completions = {"model": MODEL, "base_url": server.url + "/v1/completions", "tokenizer_backend": "huggingface",
                   "tokenizer": str(hf_dir), "add_bos_token": True, "max_retries": 1, "max_length": 256}
    runs = {"server": {"model": "local-completions", "model_args": completions, "task": "exo_mc", "batch_size": 4},
            "hf": {"model": "hf", "task": "exo_mc", "batch_size": 4,
                   "model_args": {"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu",
                                  "add_bos_token": True}},
            "chat": {"model": "local-chat-completions", "task": "exo_gen", "chat": True,
                     "model_args": {"model": MODEL, "base_url": server.url + "/v1/chat/completions",
                                    "tokenizer_backend": "none", "max_retries": 1}}}
    config = tmp / "config.json"
    config.write_text(json.dumps({"tasks_dir": str(tasks), "runs": runs, "out": str(tmp / "out.json")}))
    home = tmp / "hf_home"  # any cache lm-eval or datasets writes stays here
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets"), "OPENAI_API_KEY": "unused",
           "TOKENIZERS_PARALLELISM": "false"}
    try:
        p = subprocess.run([sys.executable, "-c", DRIVER, str(config)], env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-4000:]
        yield {"out": json.loads((tmp / "out.json").read_text()), "url": server.url, "log": p.stderr}
    finally:
        server.stop()


def test_multiple_choice_through_the_server_scores_what_hf_scores(setup):
    out = setup["out"]
    ours, theirs = out["server"], out["hf"]
    # every choice's (loglikelihood, is_greedy), item by item
    ll_ours = [[r[0][0] for r in item] for item in ours["resps"]]
    ll_theirs = [[r[0][0] for r in item] for item in theirs["resps"]]
    assert len(ll_ours) == len(MC) and all(len(x) == 4 for x in ll_ours)
    diff = max(abs(a - b) for x, y in zip(ll_ours, ll_theirs) for a, b in zip(x, y))
    print(f"\nlm-eval exo_mc acc: local-completions {ours['metrics']['acc,none']} hf {theirs['metrics']['acc,none']};"
          f" max |loglikelihood difference| {diff:.2e}")
    assert diff < 1e-3
    assert [[r[0][1] for r in item] for item in ours["resps"]] == [[r[0][1] for r in item] for item in theirs["resps"]]
    assert ours["metrics"]["acc,none"] == theirs["metrics"]["acc,none"]
    # the choices are told apart (a random model is not uniform): acc compares real scores
    assert all(len({round(v, 3) for v in x}) == 4 for x in ll_ours)


def test_generate_until_through_chat_completions(setup):
    """lm-eval's generations are exactly the server's greedy replies to the same messages, cut at its `until`."""
    out, url = setup["out"]["chat"], setup["url"]
    assert "exact_match,none" in out["metrics"] and len(out["resps"]) == len(GEN)
    for (question, _), resps in zip(GEN, out["resps"]):
        body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 8,
                "temperature": 0, "stop": ["\n"]}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=30).json()["choices"][0]["message"]
        assert resps[0][0] == reply["content"] and "\n" not in reply["content"]
