"""PhotonInfer: a continuous-batching LLM inference engine (torch + Triton)."""

from photoninfer.outputs import CompletionOutput, RequestOutput
from photoninfer.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name):
    # LLM pulls in torch and the model code; import it lazily so `import photoninfer` stays cheap.
    if name == "LLM":
        from photoninfer.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
