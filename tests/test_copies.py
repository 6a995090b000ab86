"""Copies stay copies: shared helpers must be identical in every root script that defines them.

Run: python -m pytest -q tests/test_copies.py

Each root script copies the helpers it needs (docs/design.md section 8). A fix made in one copy
and forgotten in another fails here. A helper that must differ in one script gets another
name there. Also checks that no root script imports another one (scripts are self-contained),
the two-part layout (the lesson, then the Appendix banner; docs/design.md section 1) and that
no script cites a page the repository does not hold.
"""
import ast
import functools
import re
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
    # validation and the out-dir/checkpoint safety of issue 18 (tests/test_bad_input.py);
    # load_weights is not listed: sft.py's adds a hint about --task
    "check_config", "read_text", "open_log", "checkpoint_sha256", "resume_config",
    "make_task", "make_tasks", "final_answer", "check_answer", "follows_format", "task_split",
    "format_prompt", "encode_prompt", "task_tokenizer", "make_word", "make_number",
    "mix_families", "collate",
    # the alignment chain (reward.py, dpo.py, ...): the pair builder, sampling, evaluation
    # (stream and prefill have other versions in gpt/llama/mlp/moe.py)
    "acceptable", "make_mistake", "edit_distance", "pair_margin", "make_pair", "synthetic_pairs",
    "policy_pairs", "build_pairs", "sample_answers", "evaluate_tasks", "completion_text",
    "generate_until", "merged_state_dict", "evaluate_majority",
    # reward.py's scoring, copied by ppo.py
    "pooled_rewards", "score", "encode_scored", "collate_scored", "build_reward_model",
]
SHARED_CONSTANTS = ["DATA_DIR", "DATASETS", "IGNORE_INDEX", "PROMPT_TEMPLATE", "TASK_FAMILIES",
                    "TEMPLATE_TOKENS", "MISTAKES", "EOT", "PAD", "ANSWER_SHAPES"]


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


# the machinery a reader who came for the idea can skip: it lives below the Plumbing banner
PLUMBING_BANNER = ("# Plumbing (the same in every script; tests/test_copies.py keeps the copies "
                   "identical)")
PLUMBING_FUNCTIONS = ["die", "field_help", "parse_config", "apply_preset", "resolve_device",
                      "resolve_dtype", "sha256_of", "download", "resolve_data", "check_out_dir",
                      "save_checkpoint", "load_checkpoint", "append_jsonl", "format_eta",
                      "check_config", "read_text", "open_log", "checkpoint_sha256",
                      "resume_config"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_concept_first_and_plumbing_last(script):
    """Issue 17: the concept starts within 300 lines, the shared machinery sits below one final
    Plumbing banner, and the file ends with the `__main__` guard."""
    path = ROOT / script
    if not path.is_file():
        pytest.skip(f"{script} not written yet")
    source = path.read_text()
    lines = source.splitlines()
    assert lines.count(PLUMBING_BANNER) == 1, f"{script}: no (or more than one) Plumbing banner"
    banner = lines.index(PLUMBING_BANNER) + 1  # 1-based line number
    tree = ast.parse(source)
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    for node in defs:
        if node.name in PLUMBING_FUNCTIONS:
            assert node.lineno > banner, f"{script}: {node.name} is defined above the Plumbing banner"
    concept = next(n for n in defs if n.name not in ("Config", "ModelConfig"))
    assert concept.lineno <= 300, f"{script}: the concept starts at line {concept.lineno}"
    assert concept.name not in PLUMBING_FUNCTIONS
    last = tree.body[-1]
    assert isinstance(last, ast.If) and "__main__" in ast.get_source_segment(source, last.test)
    assert max(len(line) for line in lines) <= 100, f"{script}: a line over 100 characters"


# Every script reads in two parts (docs/design.md section 1). The lesson (line 1 to the Appendix
# banner) holds the idea, its data, the loop, evaluation and main(); a first read stops there.
# A new capability that would make a lesson longer moves something below the banner.
APPENDIX_BANNER = "# Appendix: a first read can stop here (copies, bookkeeping, plumbing)"
LESSON_LIMIT = {"bigram.py": 400, "mlp.py": 400, "bpe.py": 400, "gpt.py": 600}  # others 700


@pytest.mark.parametrize("script", SCRIPTS)
def test_lesson_then_appendix(script):
    path = ROOT / script
    if not path.is_file():
        pytest.skip(f"{script} not written yet")
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    starts = [i + 1 for i, line in enumerate(lines) if line.startswith("# Appendix")]
    assert starts and lines[starts[0] - 1] == APPENDIX_BANNER, f"{script}: no Appendix banner"
    banner = starts[0]
    assert banner < lines.index(PLUMBING_BANNER) + 1, f"{script}: Plumbing above the Appendix"
    lesson = banner - 2  # the `# ----` line above the title belongs to the banner
    assert lesson <= LESSON_LIMIT.get(script, 700), f"{script}: the lesson has {lesson} lines"
    doc = tree.body[0]
    assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    assert doc.end_lineno - doc.lineno + 1 <= 30, f"{script}: the docstring is over 30 lines"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.lineno < banner:
            n = node.end_lineno - node.lineno + 1
            assert n <= 80, f"{script}: {node.name} above the Appendix banner has {n} lines"
    main = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert len(main) == 1 and main[0].lineno < banner, f"{script}: main() is not in the lesson"
    n = main[0].end_lineno - main[0].lineno + 1
    assert n <= 50, f"{script}: main() has {n} lines"


@pytest.mark.parametrize("script", SCRIPTS)
def test_cited_pages_are_in_the_repository(script):
    """A comment, docstring, help text or message may cite only what a clone holds."""
    path = ROOT / script
    if not path.is_file():
        pytest.skip(f"{script} not written yet")
    for name in sorted(set(re.findall(r"[\w./-]+\.md\b", path.read_text()))):
        assert (ROOT / name).is_file(), f"{script} cites {name}, which is not in the repository"
