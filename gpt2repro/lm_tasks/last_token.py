"""lambada_openai_last_token's documents: each text split before its last GPT-2 BPE token."""

from gpt2repro.tokenizer import gpt2


def split_last_token(dataset):
    enc = gpt2()

    def split(doc):
        tokens = enc.encode_ordinary(doc["text"])
        return {"context": enc.decode(tokens[:-1]), "target": enc.decode(tokens[-1:])}

    return dataset.map(split)
