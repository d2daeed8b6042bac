"""The authors' code's formats (docs/official-parity.md): the key map to and from the
official Agent state dict, and the released checkpoints."""
