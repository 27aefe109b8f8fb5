import torch

torch.set_num_threads(2)


def tiny_llama(act="relu", layers=2, d=32, d_ff=64, vocab=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=d_ff, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, hidden_act=act,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128, activation_function="gelu_new")
    return GPT2LMHeadModel(cfg).eval()


def padded_batch(seed=0, b=4, s=20, vocab=64):
    """ids [b, s] and a mask with left padding on row 0, right padding on row 1, a short row 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    m = torch.ones_like(ids)
    m[0, :6] = 0
    m[1, 13:] = 0
    m[2, 3:] = 0
    return ids, m
