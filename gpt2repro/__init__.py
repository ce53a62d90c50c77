"""gpt2repro: reproduce GPT-2 on OpenWebText with a minGPT-sized model and a cluster-scale trainer."""

__version__ = "0.1.0"
