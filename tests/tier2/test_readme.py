"""Tier 2: the README names the nodes ComfyUI registers for this pack, no more, no fewer.

The registered nodes are those ComfyUI's loader took from this pack's folder (the host
booted in-process, every custom node pack loaded; the test kit's nodes are another pack).
The README's opening paragraph says how many there are ("Eight nodes: ...") and names each
in *italics* by its display name; the Nodes section has a heading per node that gives its
class name in backticks."""
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.host

ROOT = Path(__file__).resolve().parents[2]
NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
           "sixteen").split()


@pytest.fixture(scope="module")
def registered(host):
    """{class name: display name} of this pack's nodes, as ComfyUI registered them."""
    import nodes
    module = nodes.NODE_CLASS_MAPPINGS["InfSplignRelationParse"].RELATIVE_PYTHON_MODULE
    ours = {name: nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name)
            for name, cls in nodes.NODE_CLASS_MAPPINGS.items()
            if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == module}
    assert len(ours) >= 8, ours
    return ours


def test_the_opening_paragraph_counts_and_names_every_node(registered):
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^(\w+) nodes: (.*?)\n\n", readme, re.M | re.S)
    assert match, 'the README has no paragraph starting "<number> nodes:"'
    count = NUMBERS.index(match.group(1).lower()) if match.group(1).lower() in NUMBERS else match.group(1)
    assert count == len(registered), f'the README says "{match.group(1)} nodes"; {len(registered)} are registered'
    named = set(re.findall(r"\*([^*\n]+)\*", match.group(2).replace("\n", " ")))
    assert named == set(registered.values()), (
        f"README names {sorted(named - set(registered.values()))} that are not registered; "
        f"registered but not named: {sorted(set(registered.values()) - named)}")


def test_the_nodes_section_has_a_heading_for_every_node(registered):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Nodes\n", 1)[1].split("\n## ", 1)[0]
    headings = [line for line in section.splitlines() if line.startswith("### ")]
    documented = {name for line in headings for name in re.findall(r"`(\w+)`", line)}
    assert documented == set(registered), (
        f"headings name {sorted(documented - set(registered))} that are not registered; "
        f"registered without a heading: {sorted(set(registered) - documented)}")
    for name, display in registered.items():
        line = next(h for h in headings if f"`{name}`" in h)
        assert display in line, (name, display, line)


def table_defaults(text: str) -> dict[str, str]:
    """{input name: default cell} of the first "| input | default | meaning |" table in `text`;
    a row may name several inputs ("`width`, `height` (optional)")."""
    lines = text.split("| input | default |", 1)[1].splitlines()[2:]
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name in re.findall(r"`(\w+)`", cells[0]):
            rows[name] = cells[1].strip("`")
    return rows


def same_default(cell: str, default) -> bool:
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return float(cell) == float(default)
        except ValueError:
            return False
    return cell == str(default)


@pytest.mark.parametrize("doc", ["README.md", "web/docs/InfSplignLayout.md"])
def test_layout_boxes_tables_give_the_nodes_defaults(registered, doc):
    """The input tables of InfSplign Layout Boxes (README and the node's help page) name
    every widget with a default, and give the default the node declares (tuned defaults
    change; the tables must follow)."""
    import nodes
    text = (ROOT / doc).read_text()
    if doc == "README.md":
        text = text.split("(`InfSplignLayout`", 1)[1].split("\n### ", 1)[0]
    table = table_defaults(text)
    spec = nodes.NODE_CLASS_MAPPINGS["InfSplignLayout"].INPUT_TYPES()
    widgets = {name: opts[1]["default"] for group in spec.values() for name, opts in group.items()
               if len(opts) > 1 and isinstance(opts[1], dict) and "default" in opts[1]}
    assert {"injection", "box_loss", "box_weight"} <= set(widgets)
    missing = sorted(set(widgets) - set(table))
    assert not missing, f"{doc}: the Layout Boxes table has no row for {missing}"
    wrong = {name: (table[name], default) for name, default in widgets.items() if not same_default(table[name], default)}
    assert not wrong, f"{doc}: Layout Boxes defaults (table, node): {wrong}"
