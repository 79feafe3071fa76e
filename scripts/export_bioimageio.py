"""Build a bioimage.io model package (for deepImageJ, ilastik, napari, bioimageio.core) from a trained SavedModel.

    python scripts/export_bioimageio.py --saved_model_filepath RUN/saved_model --output_folder RUN \\
        [--authors "Ada Lovelace; Alan Turing"] [--license CC-BY-4.0] [--cite "TEXT|DOI or URL" ...]

Writes OUTPUT_FOLDER/bioimageio_model/ and OUTPUT_FOLDER/bioimageio_model.zip (train_unet.py writes the same
beside saved_model/ unless --bioimageio 0). README.md, "Use the model in Fiji, ilastik, napari".
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the toolkit folder

from segkit import cliutil, tfquiet  # noqa: E402
from segkit.bioimageio_export import DEFAULT_LICENSE  # noqa: E402


def build_parser() -> cliutil.ArgumentParser:
    p = cliutil.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--saved_model_filepath", required=True, help="the saved_model/ folder train_unet.py wrote")
    p.add_argument("--output_folder", required=True, help="bioimageio_model/ and bioimageio_model.zip go here")
    p.add_argument("--authors", default=None, help="author names separated by ';' (default: this user's name)")
    p.add_argument("--license", default=DEFAULT_LICENSE, help="SPDX licence id of the model, e.g. MIT, CC-BY-4.0")
    p.add_argument("--cite", action="append", default=None, metavar="'TEXT|DOI or URL'",
                   help="a citation (repeat the flag for more; default: the NIST toolkit and the architecture's paper)")
    p.add_argument("--name", default=None, help="model name: letters, digits, spaces, _+-() (default from the metadata)")
    p.add_argument("--description", default=None, help="one-sentence description (default from the metadata)")
    p.add_argument("--test_image", default=None,
                   help="image file for the test tensors and the cover (default: a synthetic image of the minimum size)")
    p.add_argument("--cover", default=None, help="cover PNG/JPEG, 2:1 or 1:1 (default: overlay of the test prediction)")
    cliutil.add_verbose_flag(p)
    return p


def parse_cite(values: Sequence[str] | None) -> list[tuple[str, str]] | None:
    """'TEXT|DOI or URL' flags -> (text, reference) pairs; InputError for a value without '|'."""
    if not values:
        return None
    pairs = []
    for value in values:
        text, sep, ref = value.rpartition("|")
        if not sep or not text.strip() or not ref.strip():
            raise cliutil.InputError(f"--cite {value!r}: give 'TEXT|DOI' or 'TEXT|URL', e.g. "
                                     "'Ronneberger et al. 2015 U-Net|10.1007/978-3-319-24574-4_28'")
        pairs.append((text.strip(), ref.strip()))
    return pairs


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cliutil.setup_logging(args.verbose)
    authors = [a.strip() for a in args.authors.split(";") if a.strip()] if args.authors else None
    cite = parse_cite(args.cite)
    if args.test_image and not os.path.isfile(args.test_image):
        raise cliutil.InputError(f"--test_image {args.test_image}: no such file")
    tfquiet.configure(args.verbose)
    from segkit.bioimageio_export import export_bioimageio

    folder, zip_path = export_bioimageio(args.saved_model_filepath, args.output_folder, authors=authors,
                                         license=args.license, cite=cite, name=args.name, description=args.description,
                                         test_image=args.test_image, cover=args.cover)
    print(f"bioimage.io package: {folder}\n                     {zip_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cliutil.run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
