"""stepserve: a fast, small inference server for StepFun vision-language models."""
