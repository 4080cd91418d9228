"""tunelab: fine-tune chat LLMs with parameter-efficient methods and measure what each
method taught the model and what it cost."""

__version__ = "0.1.0"
