"""Tool-call parsers (--tool-call-parser): one module per model output format behind
base.ToolParser; constrained.py builds the grammar for tool_choice "required"/named."""
from __future__ import annotations

from minserve.tool_parsers.base import ToolCall, ToolParser
from minserve.tool_parsers.registry import TOOL_PARSERS, get_tool_parser

__all__ = ["TOOL_PARSERS", "ToolCall", "ToolParser", "get_tool_parser"]
