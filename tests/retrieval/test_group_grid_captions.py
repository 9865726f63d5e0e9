"""The duplicates/groups PNG grid (plmetric.retrieval.duplicates.draw_groups) captions a tile with the
folders below the drawn images' common one as well as its file name: CUB has a 0034.jpg under every
species, which the file name alone does not tell apart."""

from __future__ import annotations

from PIL import Image

from plmetric.retrieval.duplicates import draw_groups


def test_members_of_the_same_name_in_class_folders_name_their_folders(tmp_path, monkeypatch):
    from plmetric.core import checkpoint

    titles: list[str] = []
    original = checkpoint.atomic_write_figure

    def recording(fig, path, **kwargs):
        titles.extend(ax.get_title() for ax in fig.axes if ax.get_title())
        return original(fig, path, **kwargs)

    monkeypatch.setattr(checkpoint, "atomic_write_figure", recording)
    paths = []
    for species in ("054.Baltimore_Oriole", "055.Indigo_Bunting"):
        (tmp_path / species).mkdir()
        paths.append(str(tmp_path / species / "0034.jpg"))
        Image.new("RGB", (12, 9), (30, 90, 150)).save(paths[-1])
    draw_groups([paths], [[0.99, 0.98]], tmp_path / "dups.png")
    assert [t.splitlines() for t in titles] == [
        ["group 1 (2)", "054.Baltimore_Oriole", "0.990  0034.jpg"],
        ["", "055.Indigo_Bunting", "0.980  0034.jpg"],
    ]


def test_a_name_with_dollar_signs_is_drawn_as_text_not_mathtext(tmp_path):
    """'$\\frac$' is invalid mathtext: parsed as math it raised ValueError while drawing (a traceback)."""
    paths = []
    for name in ("a$\\frac$b.png", "c$x^2$d.png"):
        paths.append(str(tmp_path / name))
        Image.new("RGB", (12, 9), (30, 90, 150)).save(paths[-1])
    draw_groups([paths], [[0.99, 0.98]], tmp_path / "dups.png")
    assert (tmp_path / "dups.png").stat().st_size > 0
