"""The overlay PNG writes its text with glyphs its font has (no boxes for "—"). SYNTHETIC."""

import pytest
from PIL import Image, ImageDraw, ImageFont

from scoring.engine import compute_vbq
from scoring.engine.dicom_io import read_series
from scoring.engine.phantom import make_phantom
from scoring.engine.render import ascii_text, render_png

NOT_A_CHARACTER = "\U0010fffd"  # a private-use code point no font maps: its .notdef glyph


def missing_glyphs(text, font):
    """Characters of ``text`` that ``font`` draws as its .notdef box."""
    font = font or ImageFont.load_default()

    def bitmap(ch):
        mask = font.getmask(ch)
        return mask.size, bytes(mask)

    notdef = bitmap(NOT_A_CHARACTER)
    return sorted({ch for ch in text if not ch.isspace() and bitmap(ch) == notdef})


@pytest.fixture
def drawn_text(monkeypatch):
    """Every (text, font) the renderer draws, recorded on the way to Pillow."""
    calls = []
    original = ImageDraw.ImageDraw.text

    def record(self, xy, text, *args, **kwargs):
        calls.append((text, kwargs.get("font")))
        return original(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    return calls


def test_the_overlay_header_of_a_result_without_vbq_has_no_missing_glyph(tmp_path, drawn_text):
    phantom = make_phantom(11, fractured=())
    result = compute_vbq(phantom.datasets)
    result.vbq_all_levels = None
    result.vbq_excluding_fractured = None
    render_png(read_series(phantom.datasets), result, tmp_path / "o.png")
    assert any("VBQ" in text for text, _ in drawn_text)
    missing = {text: missing_glyphs(text, font) for text, font in drawn_text}
    assert not any(missing.values()), missing


def test_the_overlay_of_a_measured_phantom_is_a_png_with_every_label(tmp_path, drawn_text):
    phantom = make_phantom(11, fractured=())
    result = compute_vbq(phantom.datasets)
    path = render_png(read_series(phantom.datasets), result, tmp_path / "o.png")
    assert Image.open(path).format == "PNG"
    texts = " ".join(text for text, _ in drawn_text)
    assert all(level in texts for level in ("L1", "L2", "L3", "L4"))


def test_the_ascii_fallback_spells_the_missing_value_in_ascii():
    assert ascii_text("VBQ — (excluding fractured —) ≥ 3") == "VBQ - (excluding fractured -) >= 3"
