"""Run SGLang programs with the real `sglang` frontend against `kestrel serve`, recording every HTTP call it makes."""
import json, sys
import sglang as sgl
import sglang.utils as su
import sglang.lang.backend.runtime_endpoint as rt

calls = []
_orig = su.http_request

def recording(url, json=None, stream=False, api_key=None, verify=None, method=None):
    res = _orig(url, json=json, stream=stream, api_key=api_key, verify=verify, method=method)
    path = url.split("://", 1)[1].split("/", 1)[1]
    entry = {"method": method or ("POST" if json is not None else "GET"), "path": "/" + path, "body": json,
             "stream": bool(stream), "status": res.status_code}
    if stream:
        lines = [l.decode() for l in res.iter_lines(decode_unicode=False) if l]
        entry["events"] = lines
        res = _Replayed(res.status_code, lines)
    else:
        entry["response"] = res.json()
    calls.append(entry)
    return res

class _Replayed:
    def __init__(self, status, lines):
        self.status_code, self._lines = status, lines
    def iter_lines(self, decode_unicode=False):
        for l in self._lines:
            yield l.encode()
    def json(self):
        return {}

su.http_request = recording
rt.http_request = recording

@sgl.function
def qa_and_verdict(s, question):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=16, temperature=0, stop="\n"))
    s += sgl.user("Is that answer good? Say yes or no.")
    s += sgl.assistant(sgl.select("verdict", choices=["yes", "no"]))

@sgl.function
def typed(s):
    s += "The Eiffel Tower was finished in " + sgl.gen("year", regex=r"1[0-9]{3}", max_tokens=8, temperature=0)
    s += ".\nA number: " + sgl.gen_int("num", max_tokens=6)
    s += "\nA city: " + sgl.gen("city", dtype=str, max_tokens=12)
    s += "\nPick: " + sgl.select("pick", choices=["red", "green", "blue"],
                                 choices_method=sgl.unconditional_likelihood_normalized)
    s += '\nJSON: ' + sgl.gen("obj", max_tokens=40, temperature=0,
                              json_schema=json.dumps({"type": "object", "properties": {"n": {"type": "integer"}},
                                                      "required": ["n"]}))

@sgl.function
def forked(s):
    s += "List two fruits.\n"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Fruit {i + 1}: " + sgl.gen("fruit", max_tokens=6, temperature=0.8, stop="\n")
    forks.join()

@sgl.function
def blocks(s, q):
    with s.user():
        s += q
    with s.assistant():
        s += sgl.gen("a", max_tokens=12, temperature=0, return_logprob=True, top_logprobs_num=2,
                     return_text_in_logprobs=True)

backend = sgl.RuntimeEndpoint(sys.argv[1], chat_template_name="chatml")
sgl.set_default_backend(backend)
out = {}
out["qa"] = qa_and_verdict.run(question="What is the capital of France?")["verdict"]
st = typed.run()
out["typed"] = [st["year"], st["num"], st["pick"], st["obj"]]
out["forked"] = [f for f in forked.run().text().splitlines()]
st = blocks.run(q="Name a color.")
out["blocks"] = st["a"]
st = qa_and_verdict.run(question="Say hi.", stream=True)
out["stream"] = "".join(st.text_iter())[-40:]
out["batch"] = [s["verdict"] for s in qa_and_verdict.run_batch([{"question": "2+2?"}, {"question": "Capital of Italy?"}],
                                                            num_threads=1)]
backend.get_server_info()
backend.flush_cache()
print(json.dumps(out, indent=1))
json.dump({"sglang_version": sgl.__version__, "calls": calls}, open(sys.argv[2], "w"), indent=1)
print(len(calls), "calls recorded")
