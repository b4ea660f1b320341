"""Checkpoints in the sllmd v1 format (docs/checkpoint-format.md).

The spec in code: `manifest` (parse and validate, limits, dtypes), `layout` (placing and hashing tensors),
`errors` (the named errors). Writing: `convert` (Hugging Face directories, reading them through `hf_source`),
`gguf` (GGUF files). Reading: `reader` (data files, verify, a reference reader), the fast `loader` (with its
reader threads `threads`, host buffer pool `pool` and DRAM cache tier `dram`). Getting them: `store` (the
node's SSD store), `fetch`, `url_fetch`, `hub`, `hub_ref`. The `sllmd convert` / `sllmd verify` commands are
in `sllmd.tools`.

Importing this package, `manifest` or `layout` imports neither torch nor transformers.
"""
