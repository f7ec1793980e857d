"""Update rules: first-order (optax) and zeroth-order (MeZO, DiZO), and LoRA adapters."""
