"""Device backends: compile backends and fused kernels for devices that need more than inductor.

Each backend imports its vendor packages lazily (inside functions), so importing
`zoo.backends.<name>` works on any machine; only using it needs the vendor stack.

- `zoo.backends.npu`: Ascend NPU through torch_npu + torchair (see docs/npu.md).
"""
