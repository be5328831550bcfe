"""Tiny configs of every supported family, shared by the tests (no downloads)."""

TINY = {
    "gpt2": dict(
        n_embd=32, n_layer=4, n_head=4, n_positions=64, vocab_size=96, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    ),
    "llama": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
    ),
    "mistral": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
        sliding_window=5,
    ),
    "qwen2": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
    "opt": dict(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=96,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=1,
    ),
    "gpt_neox": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=96,
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        rotary_pct=0.5,
    ),
}
