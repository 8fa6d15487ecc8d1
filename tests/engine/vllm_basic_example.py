# Ported from vLLM's examples/offline_inference/basic/basic.py (Apache-2.0, the vLLM project),
# with a log-prob read and a chat call (as in vLLM's basic/chat.py) added at the end of main().
# Nothing differs from what runs on vLLM but the import line. test_vllm_api.py runs it from a
# folder holding a tiny checkpoint at facebook/opt-125m.

from srlm_engine import LLM, SamplingParams

# Sample prompts.
prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
# Create a sampling params object.
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)


def main():
    # Create an LLM.
    llm = LLM(model="facebook/opt-125m")
    # Generate texts from the prompts.
    # The output is a list of RequestOutput objects
    # that contain the prompt, generated text, and other information.
    outputs = llm.generate(prompts, sampling_params)
    # Print the outputs.
    print("\nGenerated Outputs:\n" + "-" * 60)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"Prompt:    {prompt!r}")
        print(f"Output:    {generated_text!r}")
        print("-" * 60)

    # The log-prob of each prompt's first generated token, and its rank.
    outputs = llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.95, logprobs=2))
    for output in outputs:
        tok = output.outputs[0].token_ids[0]
        first = output.outputs[0].logprobs[0][tok]
        print(f"First:     {tok} {first.logprob!r} {first.rank} {first.decoded_token!r}")

    # A chat.
    conversation = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I assist you today?"},
        {"role": "user", "content": "Write an essay about the importance of higher education."},
    ]
    outputs = llm.chat(conversation, sampling_params, use_tqdm=False)
    for output in outputs:
        print(f"Chat:      {output.prompt!r}")
        print(f"Reply:     {output.outputs[0].text!r}")


if __name__ == "__main__":
    main()
