

def test_same_architecture_by_class_else_by_model_type():
    from mergelab.arch import same_architecture

    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    assert same_architecture(llama, {"model_type": "llama"})  # no class named: compared by model_type
    assert not same_architecture(llama, {"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    assert not same_architecture(llama, {"model_type": "mistral"})
    assert same_architecture(llama, {})
