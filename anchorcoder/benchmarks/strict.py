"""``execution.strict_equality``: every ``==`` of a benchmark's test code also compares types.

A wrong solution can return an object whose ``__eq__`` is always true; assert-based tests (HumanEval,
MBPP, EvalPlus) then pass it. With the option on, the test code (never the solution) is rewritten so
that each ``a == b`` becomes a call that is true only when one value's type is the other's or a
subclass of it, all the way down (lists, tuples and dicts element by element; ``int``, ``float`` and
``bool`` count as one numeric type, as the tests mix them), and the values are equal by the *common*
type's ``==`` (so a ``Counter`` equals its ``dict``, and an ``int`` subclass cannot bring its own
``__eq__``). Off by default: the benchmarks' own semantics.
"""

from __future__ import annotations

import ast

HELPER = "__anchorcoder_strict_equal__"
DEFINITION = f"""
def {HELPER}(a, b):
    numbers = (int, float, bool)
    if type(a) in numbers and type(b) in numbers:
        return a == b
    if issubclass(type(a), type(b)):
        common = type(b)
    elif issubclass(type(b), type(a)):
        common = type(a)
    else:
        return False
    if issubclass(common, (list, tuple)):
        return len(a) == len(b) and all({HELPER}(x, y) for x, y in zip(a, b))
    if issubclass(common, dict):
        keys = dict.keys(a)
        return keys == dict.keys(b) and all({HELPER}(dict.__getitem__(a, k), dict.__getitem__(b, k)) for k in keys)
    return common.__eq__(a, b) is True
"""


class _StrictEquality(ast.NodeTransformer):
    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        if len(node.ops) != 1 or not isinstance(node.ops[0], ast.Eq):
            return node  # chains and other operators keep their meaning
        call = ast.Call(ast.Name(HELPER, ast.Load()), [node.left, node.comparators[0]], [])
        return ast.copy_location(call, node)


def strict_tests(tests: str) -> str:
    """``tests`` with every single ``==`` made type-strict; unchanged if it does not parse on its own."""
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return tests
    return DEFINITION + ast.unparse(ast.fix_missing_locations(_StrictEquality().visit(tree))) + "\n"
