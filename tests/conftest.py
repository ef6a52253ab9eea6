"""Session setup that must precede every test module's imports: the Triton kernels run in the interpreter on CPU
tensors (tests/test_fused_logprob.py), and TRITON_INTERPRET only takes effect if set before triton is first
imported -- which any module importing train.py or model_utils.py does (fused_logprob imports triton). Subprocesses
inherit it harmlessly: on CPU tensors backend="auto" takes the torch path. tests/test_triton_aot.py removes it for
its compile workers."""
import os

os.environ["TRITON_INTERPRET"] = "1"
