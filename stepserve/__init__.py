"""stepserve: a fast, small inference server for StepFun vision-language models."""

from stepserve.engine.outputs import CompletionOutput, RequestOutput
from stepserve.engine.sampling_params import SamplingParams


def __getattr__(name: str):
    # LLM pulls in torch and the model code; import it on first use so `stepserve.api` stays light.
    if name == "LLM":
        from stepserve.engine.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
