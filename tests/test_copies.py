"""Copies stay copies: shared helpers must be identical in every root script that defines them.

Run: python -m pytest -q tests/test_copies.py

Each root script copies the helpers it needs (DESIGN.md section 8). A fix made in one copy
and forgotten in another fails here. A helper that must differ in one script gets another
name there. Also checks that no root script imports another one (scripts are self-contained).
"""
import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["bigram.py", "mlp.py", "bpe.py", "gpt.py", "llama.py", "moe.py", "sft.py",
           "reward.py", "dpo.py", "ppo.py", "grpo.py"]
# helpers that several scripts copy: config->CLI, device/dtype, download, checkpoints, get_lr,
# sampling, the bpe.py tokenizer loader, and (from sft.py on) the task world
SHARED_FUNCTIONS = [
    "die", "field_help", "parse_config", "apply_preset", "resolve_device", "resolve_dtype",
    "sha256_of", "download", "resolve_data", "load_bpe", "sample_logits", "get_lr",
    "check_out_dir", "save_checkpoint", "load_checkpoint", "append_jsonl", "format_eta",
    "make_task", "make_tasks", "check_answer", "task_split", "format_prompt", "encode_prompt",
]
SHARED_CONSTANTS = ["DATA_DIR", "DATASETS", "IGNORE_INDEX", "PROMPT_TEMPLATE", "TASK_FAMILIES",
                    "TEMPLATE_TOKENS"]


@functools.lru_cache(maxsize=None)
def definitions(path):
    """name -> source text of every top-level function and constant assignment in a script."""
    source = path.read_text()
    tree = ast.parse(source)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    found[t.id] = ast.get_source_segment(source, node)
    return found


def present_scripts():
    return [s for s in SCRIPTS if (ROOT / s).is_file()]


@pytest.mark.parametrize("name", SHARED_FUNCTIONS + SHARED_CONSTANTS)
def test_shared_helper_identical_everywhere(name):
    copies = {}
    for script in present_scripts():
        src = definitions(ROOT / script).get(name)
        if src is not None:
            copies[script] = src
    if len(copies) < 2:
        pytest.skip(f"{name} is defined in fewer than two scripts")
    first_script, first = next(iter(copies.items()))
    for script, src in copies.items():
        assert src == first, f"{name} in {script} differs from the copy in {first_script}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_import_no_other_script(script):
    path = ROOT / script
    if not path.is_file():
        pytest.skip(f"{script} not written yet")
    tree = ast.parse(path.read_text())
    modules = {s[:-3] for s in SCRIPTS}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            continue
        assert not modules.intersection(names), f"{script} imports another root script: {names}"
