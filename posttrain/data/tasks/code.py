"""Code benchmarks -> canonical rows whose answer is the problem's `CodeTests` (JSON).

HumanEval: the model continues the prompt (signature + docstring); the tests' `check(candidate)` runs with
the prompt as trusted context, so helpers such as `poly` (HumanEval/32) are the original ones.
MBPP: the standard prompt (task text + its asserts); the model writes the whole function.
Stdio (APPS style): a problem statement with (input, output) pairs.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from posttrain.verifiers.code import CodeTests

MBPP_TEMPLATE = "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\n\n{tests}\n"
STDIO_TEMPLATE = "{question}\n\nWrite a Python program that reads from standard input and writes to standard output.\n"


def _need_str(row: dict[str, Any], *keys: str) -> list[str]:
    values = [row.get(k) for k in keys]
    missing = [k for k, v in zip(keys, values) if not isinstance(v, str) or not v.strip()]
    if missing:
        raise ValueError(f"missing or empty {', '.join(repr(k) for k in missing)}")
    return values


def humaneval_row(row: dict[str, Any], rid: str, template: str | None = None) -> dict[str, Any]:
    prompt, solution, test, entry = _need_str(row, "prompt", "canonical_solution", "test", "entry_point")
    tests = CodeTests(entry=entry, tests=[{"name": rid, "code": test + "\n\ncheck(candidate)\n"}], context=prompt, prefix=prompt)
    text = template.format(prompt=prompt) if template else prompt
    return {"id": rid, "prompt": text, "completion": solution, "answer": tests.to_json(), "messages": None}


def defined_functions(code: str) -> list[str]:
    """Top-level function names of a program, in order (empty if it does not parse)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _called_names(asserts: list[str]) -> list[str]:
    names = []
    for line in asserts:
        names += re.findall(r"\b([A-Za-z_]\w*)\s*\(", line)
    return names


def mbpp_row(row: dict[str, Any], rid: str, template: str | None = None) -> dict[str, Any]:
    text, code = _need_str(row, "text", "code")
    asserts = row.get("test_list")
    if not isinstance(asserts, list) or not asserts or not all(isinstance(a, str) for a in asserts):
        raise ValueError("'test_list' must be a non-empty list of assert strings")
    defined = defined_functions(code)
    entry = next((n for n in _called_names(asserts) if n in defined), None)
    if entry is None:
        raise ValueError("no function of the reference code is called by the tests")
    tests = CodeTests(entry=entry, tests=[{"name": f"test {i}", "code": a} for i, a in enumerate(asserts)],
                      fixtures=(row.get("test_setup_code") or "").strip())
    prompt = (template or MBPP_TEMPLATE).format(text=text.strip(), tests="\n".join(asserts))
    return {"id": rid, "prompt": prompt, "completion": code.replace("\r\n", "\n"), "answer": tests.to_json(),
            "messages": None}


def stdio_row(row: dict[str, Any], rid: str, template: str | None = None) -> dict[str, Any]:
    """{question|prompt, inputs, outputs} or APPS' {question, input_output: '{"inputs": [...], "outputs": [...]}'}."""
    question = row.get("question") or row.get("prompt")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("missing 'question' (or 'prompt')")
    io = row.get("input_output")
    if isinstance(io, str):
        try:
            io = json.loads(io)
        except json.JSONDecodeError as exc:
            raise ValueError(f"'input_output' is not JSON: {exc}") from None
    io = io or {"inputs": row.get("inputs"), "outputs": row.get("outputs")}
    inputs, outputs = io.get("inputs"), io.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or not inputs or len(inputs) != len(outputs):
        raise ValueError("needs equally long, non-empty 'inputs' and 'outputs' lists")
    if not all(isinstance(x, str) for x in inputs + outputs):
        raise ValueError("inputs and outputs must be strings")
    tests = CodeTests(cases=list(zip(inputs, outputs)))
    solution = row.get("solution") if isinstance(row.get("solution"), str) else None
    prompt = (template or STDIO_TEMPLATE).format(question=question.strip())
    return {"id": rid, "prompt": prompt, "completion": solution, "answer": tests.to_json(), "messages": None}


CODE_FORMATS = {"humaneval": humaneval_row, "mbpp": mbpp_row, "stdio": stdio_row}
