"""tvgate: the LLM gateway of Visdom Trace."""

__version__ = "0.1.0"
