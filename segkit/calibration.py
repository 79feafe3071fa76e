"""An image's physical pixel size and unit: read from the input TIFF, written into every output.

Read: OME-TIFF ``PhysicalSizeX/Y`` (+ units), ImageJ's ``unit`` with the XResolution/YResolution tags,
or those tags with a centimetre/inch ResolutionUnit. Written: ImageJ-compatible TIFF tags
(:func:`tiff_kwargs`) and OME-Zarr ``coordinateTransformations`` with axis units (:func:`ome_zarr_unit`).
README.md, "Stage 3" (outputs). No TensorFlow here.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from segkit import volume_io

log = logging.getLogger(__name__)

# unit spellings -> OME-NGFF / UDUNITS name; their sizes in micrometres: volume_io's table (one home)
_UNITS = {
    "micron": "micrometer", "microns": "micrometer", "um": "micrometer", "\u00b5m": "micrometer",
    "\u03bcm": "micrometer", "micrometer": "micrometer", "\\u00b5m": "micrometer", "nm": "nanometer",
    "nanometer": "nanometer", "mm": "millimeter", "millimeter": "millimeter", "cm": "centimeter",
    "centimeter": "centimeter", "m": "meter", "meter": "meter", "inch": "inch", "in": "inch",
}
_IMAGEJ_UNIT = {"micrometer": "micron", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm",
                "meter": "m", "inch": "inch"}


@dataclass(frozen=True)
class Calibration:
    """Pixel size per spatial axis (``pixel_size_yx``: y then x) in ``unit`` (an OME-NGFF unit name)."""
    pixel_size_yx: tuple[float, ...]
    unit: str

    def micrometres_per_unit(self) -> float:
        return volume_io.UNIT_UM[self.unit]


def _unit(text: str | None) -> str | None:
    if not text:
        return None
    known = _UNITS.get(str(text).strip().lower()) or _UNITS.get(str(text).strip())
    return known


def read_calibration(path: str) -> Calibration | None:
    """The pixel size of an image file, or None (not a TIFF, uncalibrated, or unreadable metadata)."""
    if os.path.isdir(path) or os.path.splitext(path)[1].lower() not in (".tif", ".tiff"):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome and tif.ome_metadata:
                found = _from_ome(tif.ome_metadata)
                if found:
                    return found
            return _from_tags(tif.pages[0].tags, tif.imagej_metadata or {})
    except Exception as exc:  # calibration is a courtesy: never fail an image over it
        log.debug("%s: no calibration read (%s)", path, exc)
        return None


def _from_ome(xml: str) -> Calibration | None:
    pixels = volume_io.ome_pixels(xml)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    size_x = float(pixels.attrib["PhysicalSizeX"])
    size_y = float(pixels.attrib.get("PhysicalSizeY", size_x))
    unit = _unit(pixels.attrib.get("PhysicalSizeXUnit", "\u00b5m"))
    return Calibration((size_y, size_x), unit) if unit and size_x > 0 and size_y > 0 else None


def _from_tags(tags, imagej: dict) -> Calibration | None:
    per_pixel = volume_io.tiff_pixels_per_unit(tags)
    if per_pixel is None:
        return None
    sizes = (1.0 / per_pixel[0], 1.0 / per_pixel[1])
    unit = _unit(imagej.get("unit"))
    if unit is None:
        resunit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 0
        factor = volume_io.TIFF_RESOLUTION_UNIT_UM.get(resunit)
        if factor is None or sizes == (1.0, 1.0):
            return None  # no unit, or the writer's default 1 pixel per inch/cm: uncalibrated
        return Calibration(tuple(s * factor for s in sizes), "micrometer")
    return Calibration(sizes, unit)


def tiff_kwargs(calibration: Calibration | None, imagej: bool) -> dict:
    """tifffile.imwrite / TiffWriter.write arguments that carry the calibration.

    ``imagej``: an ImageJ-format file (the unit goes into ImageJ's description, ResolutionUnit NONE);
    otherwise (BigTIFF) the resolution is stored per centimetre, which ImageJ, Fiji and Bio-Formats read.
    """
    if calibration is None:
        return {}
    size_y, size_x = calibration.pixel_size_yx[-2:]
    if imagej:
        return {"resolution": (1.0 / size_x, 1.0 / size_y), "resolutionunit": "NONE",
                "unit": _IMAGEJ_UNIT[calibration.unit]}
    cm = calibration.micrometres_per_unit() / 1e4
    return {"resolution": (1.0 / (size_x * cm), 1.0 / (size_y * cm)), "resolutionunit": "CENTIMETER"}


def ome_zarr_unit(calibration: Calibration | None) -> str | None:
    return None if calibration is None else calibration.unit
