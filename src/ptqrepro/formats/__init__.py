"""Number formats as fake-quantizers, and the one parser for format strings."""

from ptqrepro.formats.base import GroupedFormat, QuantizedWeight
from ptqrepro.formats.integer import IntFormat
from ptqrepro.formats.mx import MXFormat
from ptqrepro.formats.parse import parse_format

__all__ = ["GroupedFormat", "IntFormat", "MXFormat", "QuantizedWeight", "parse_format"]
