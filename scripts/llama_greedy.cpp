// Reference helper (not part of the product): greedy token ids from llama.cpp for one raw prompt.
// Build against a llama.cpp checkout beside the project:
//   g++ -O2 -std=c++17 scripts/llama_greedy.cpp -I$LL/include -I$LL/ggml/include -L$LL/build/bin -lllama -lggml -lggml-base -o /tmp/llama_greedy
// Usage: LD_LIBRARY_PATH=$LL/build/bin /tmp/llama_greedy MODEL.gguf N "prompt"
// Prints the prompt ids on line 1, the generated ids on line 2 (comma-separated) and on line 3
// llama.cpp's margin (top-1 minus top-2 logit) at each generated step, which tells near-ties.
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static void print_ids(const std::vector<llama_token> & ids) {
    for (size_t i = 0; i < ids.size(); i++) printf(i ? ",%d" : "%d", ids[i]);
    printf("\n");
}

int main(int argc, char ** argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s MODEL N PROMPT\n", argv[0]); return 1; }
    const int n_predict = atoi(argv[2]);
    const char * prompt = argv[3];
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) return 1;
    const llama_vocab * vocab = llama_model_get_vocab(model);
    int n = -llama_tokenize(vocab, prompt, strlen(prompt), nullptr, 0, true, false);
    std::vector<llama_token> ids(n);
    llama_tokenize(vocab, prompt, strlen(prompt), ids.data(), n, true, false);
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_batch = 512;
    cp.n_threads = cp.n_threads_batch = 2;
    llama_context * ctx = llama_init_from_model(model, cp);
    llama_sampler * smpl = llama_sampler_init_greedy();
    print_ids(ids);
    std::vector<llama_token> out;
    std::vector<float> margins;
    const int n_vocab = llama_vocab_n_tokens(vocab);
    llama_batch batch = llama_batch_get_one(ids.data(), ids.size());
    llama_token tok;
    for (int i = 0; i < n_predict; i++) {
        if (llama_decode(ctx, batch)) return 1;
        const float * l = llama_get_logits_ith(ctx, -1);
        float a = -1e30f, b = -1e30f;
        for (int v = 0; v < n_vocab; v++) {
            if (l[v] > a) { b = a; a = l[v]; } else if (l[v] > b) { b = l[v]; }
        }
        tok = llama_sampler_sample(smpl, ctx, -1);
        if (llama_vocab_is_eog(vocab, tok)) break;
        out.push_back(tok);
        margins.push_back(a - b);
        batch = llama_batch_get_one(&tok, 1);
    }
    print_ids(out);
    for (size_t i = 0; i < margins.size(); i++) printf(i ? ",%.4f" : "%.4f", margins[i]);
    printf("\n");
    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
