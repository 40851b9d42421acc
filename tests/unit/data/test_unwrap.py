"""corpus.unwrap: hard-wrapped paragraphs joined, everything else kept; `unwrap: false` gives today's shards."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.data.corpus import clean_text
from pipeline.data.unwrap import unwrap, wrap_width
from tests.helpers.project import ROOT, generated_book, generated_instructions, make_project, venv_env

WRAPPED = """CAPÍTULO PRIMERO

En un lugar de la Mancha, de cuyo nombre no quiero acordarme, no ha mucho
tiempo que vivía un hidalgo de los de lanza en astillero, adarga antigua,
rocín flaco y galgo corredor. Una olla de algo más vaca que carnero,
salpicón las más noches, duelos y quebrantos los sábados, lantejas los
viernes, algún palomino de añadidura los domingos.

Es, pues, de saber que este sobredicho hidalgo, los ratos que estaba
ocioso, que eran los más del año, se daba a leer libros de caballerías,
con tanta afición y gusto, que olvidó casi de todo punto el ejercicio de
la caza, y aun la administración de su hacienda. Y llegó a tanto su
curiosidad y desatino en esto, que vendió muchas hanegas de tierra de
sembradura para comprar libros de caballerías en que leer.

—Yo sé quién soy —respondió don Quijote—, y sé que puedo ser no sólo los
que he dicho, sino todos los Doce Pares de Francia, y aun todos los Nueve
de la Fama.
—Mire vuestra merced —respondió Sancho— que aquellos que allí se parecen
no son gigantes, sino molinos de viento.

Soneto

Tú, que imitaste la llorosa vida
que tuve, ausente y desdeñado sobre
el gran ribazo de la Peña Pobre,

    Un verso sangrado que sigue a la estrofa y que no es prosa ninguna,
    y otro verso sangrado.
"""


def test_unwrap_joins_paragraph_lines_and_keeps_the_rest():
    text = unwrap(WRAPPED)
    paragraphs = text.split("\n")
    assert paragraphs[0] == "CAPÍTULO PRIMERO" and paragraphs[1] == ""
    assert paragraphs[2].startswith("En un lugar de la Mancha") and paragraphs[2].endswith("los domingos.")
    assert "acordarme, no ha mucho tiempo que vivía" in paragraphs[2]
    assert paragraphs[4].startswith("Es, pues, de saber") and paragraphs[4].endswith("en que leer.")
    assert paragraphs[6].startswith("—Yo sé quién soy") and paragraphs[6].endswith("Nueve de la Fama.")
    assert paragraphs[7].startswith("—Mire vuestra merced") and paragraphs[7].endswith("molinos de viento.")
    assert "Soneto\n\nTú, que imitaste la llorosa vida\nque tuve, ausente y desdeñado sobre\nel gran" in text
    assert (
        "\n    Un verso sangrado que sigue a la estrofa y que no es prosa ninguna,\n    y otro verso" in text
    )
    assert text.split() == WRAPPED.split()  # only line breaks became spaces


def test_text_that_is_not_hard_wrapped_is_left_alone():
    paragraphs = "\n\n".join(
        "Una frase larga de un párrafo entero en una sola línea, " * (3 + i % 5) for i in range(30)
    )
    assert wrap_width(paragraphs.split("\n")) is None and unwrap(paragraphs) == paragraphs
    assert unwrap("corto\n") == "corto\n"


def test_unwrap_of_a_whole_book_changes_only_line_breaks(shared_data):
    raw = (shared_data / "quijote.txt").read_bytes() if shared_data else generated_book().encode()
    wrapped = clean_text(raw, "book", gutenberg=True, normalise=True, unwrap=False)
    joined = clean_text(raw, "book", gutenberg=True, normalise=True, unwrap="gutenberg")
    assert joined.count("\n") < 0.5 * wrapped.count("\n") and joined.count("\n\n") == wrapped.count("\n\n")
    assert joined.split() == wrapped.split()


def test_unwrap_setting_chooses_the_documents():
    book = "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n" + WRAPPED
    plain = WRAPPED
    assert clean_text(book.encode(), "b", gutenberg=True, normalise=True, unwrap="gutenberg") == unwrap(
        WRAPPED
    )
    assert clean_text(plain.encode(), "p", gutenberg=True, normalise=True, unwrap="gutenberg") == WRAPPED
    assert clean_text(plain.encode(), "p", gutenberg=True, normalise=True, unwrap=True) == unwrap(WRAPPED)
    assert clean_text(book.encode(), "b", gutenberg=True, normalise=True, unwrap=False) == WRAPPED


# sha256 of data/raw/corpus.txt and the shards of the default params on the default book, written by the code
# before corpus.unwrap existed (commit fa4a67c): Don Quijote from ../shared, else tests.helpers.project.generated_book().
TODAY = {
    "shared": {
        "corpus.txt": "b23f7e93e3641ed041e59ed21da93c0d5610e991c9a2688e034c4345829b76b3",
        "train_0000.bin": "e9f2426e4c105ecbf520437ce9b71c8c6c018c8a42f82a287b8d43b2c5da357d",
        "val_0000.bin": "152e4be739b6c1bb154cca94d15c5acedfdb6da20bc4e8e2e7aed1608ab37736",
    },
    "generated": {
        "corpus.txt": "44e1a9204a313797f2378f0d09cb782f899a233addf5767f6571d50b72e5c8a6",
        "train_0000.bin": "b0db455e2f545aedf6201f6bb7dae36e6f9c485b0c507e1525f1811c04d26b92",
        "val_0000.bin": "5ef8d33e1949cc49c49e345ebcdc283bef50771700d25ecfcbff639a78f85fd3",
    },
}


def default_book_project(dest: Path, shared_data: Path | None, corpus: dict) -> Path:
    """The default params.yaml with local inputs: the default book and instruction data (or generated ones)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["cache_dir"] = None
    params["corpus"] = {**params["corpus"], "sources": ["inputs/book.txt"], **corpus}
    params["sft"]["data"], params["dpo"]["data"] = "inputs/sft.json", "inputs/dpo.json"
    project = make_project(dest, params)
    book = (shared_data / "quijote.txt").read_bytes() if shared_data else generated_book().encode()
    (project / "inputs/book.txt").write_bytes(book)
    if shared_data is None:
        (project / "inputs/sft.json").write_text(json.dumps(generated_instructions(60)))
        (project / "inputs/dpo.json").write_text(
            json.dumps(generated_instructions(60, seed=1, preferences=True))
        )
    else:
        (project / "inputs/sft.json").write_bytes((shared_data / "instruction-data.json").read_bytes())
        (project / "inputs/dpo.json").write_bytes(
            (shared_data / "instruction-data-with-preference.json").read_bytes()
        )
    return project


def file_hashes(project: Path) -> dict[str, str]:
    files = [project / "data/raw/corpus.txt", *sorted((project / "data/shards").glob("*.bin"))]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.integration  # stage processes
def test_unwrap_false_reproduces_todays_shards_byte_for_byte(tmp_path, shared_data):
    project = default_book_project(tmp_path / "p", shared_data, {"unwrap": False})
    env = {**venv_env(), "PYTHONPATH": str(project)}
    for stage in ("download", "tokenize"):
        out = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr
    assert file_hashes(project) == TODAY["shared" if shared_data else "generated"]
