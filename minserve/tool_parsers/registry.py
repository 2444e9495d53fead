"""--tool-call-parser NAME -> parser class. A new format registers here with one line and
touches no other parser."""
from __future__ import annotations

from minserve.tool_parsers.base import ToolParser
from minserve.tool_parsers.gemma4 import Gemma4ToolParser
from minserve.tool_parsers.generic import GenericToolParser
from minserve.tool_parsers.hermes import HermesToolParser
from minserve.tool_parsers.llama3_json import Llama3JsonToolParser
from minserve.tool_parsers.mistral import MistralToolParser
from minserve.tool_parsers.openai import OpenAIToolParser
from minserve.tool_parsers.phi4_mini_json import Phi4MiniJsonToolParser
from minserve.tool_parsers.pythonic import PythonicToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls
    for cls in (GenericToolParser, HermesToolParser, Llama3JsonToolParser, MistralToolParser,
                OpenAIToolParser, PythonicToolParser, Gemma4ToolParser, Phi4MiniJsonToolParser)
}


def get_tool_parser(name: str) -> type[ToolParser]:
    """The class for a --tool-call-parser name; ValueError names the choices."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of "
                         f"{', '.join(sorted(TOOL_PARSERS))}") from None
