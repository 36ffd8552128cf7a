"""A record of the triton backend's launches of fixed configurations, for the tests of what a GPU
with less shared memory than an H100 runs (test_gpu.py on the GPU, test_triton_compile.py
launched dry in a process of its own, which does not import conftest: that would switch
Triton's interpreter on)."""


def record_stages(set_attribute=setattr) -> list:
    """Wraps the triton backend's ``_launch`` (through ``set_attribute``: pytest's
    ``monkeypatch.setattr`` undoes it) so that each launch of a fixed configuration (autotuning
    off) is recorded as (kernel, stages asked for, stages launched, shared bytes) in the list
    returned; not the sum kernel (one configuration, no tiles)."""
    from condconv_kernels import triton as backend
    launched, launch = [], backend._launch

    def spy(kernel, grid, args, kwargs, launches=None):
        kept = launch(kernel, grid, args, kwargs, launches)
        if "num_stages" in kwargs:
            launched.append((kernel.__name__, kwargs["num_stages"], kept[0][3]["num_stages"],
                             kept[0][4].metadata.shared))
        return kept
    set_attribute(backend, "_launch", spy)
    return launched
