"""Number formats as fake-quantizers, and the one parser for format strings."""

from ptqrepro.formats.integer import IntFormat, QuantizedWeight
from ptqrepro.formats.parse import parse_format

__all__ = ["IntFormat", "QuantizedWeight", "parse_format"]
