"""`python -m infer.serve` with a Llama 3.2 Vision checkpoint behind a Vision guard.

The openai client's chat with an image_url data URL (whole, and streamed with the plain loop)
gets the greedy tokens `infer.generate` makes for the prompt `python -m infer --chat --image`
writes; requests with different images, and without, decoded side by side each get their own;
bad images are one 400 each. The guard (tests/conftest.py's tiny trained guard, its text
layers put in an Mllama) judges the user turn with its image as `infer.guard` does: the
server refuses the prompt it calls unsafe and serves the one it calls safe.
"""

import base64
import concurrent.futures
import dataclasses
import io

import numpy as np
import openai
import pytest

import guard_tiny as gt
from infer import generate, load_model
from infer.guard_model import Guard
from llama_jax.text.chat import format_chat
from llama_jax.vision.image import load_image
from servers import Server, free_port
from test_vision import drawn_image
from tiny import VISION_LIKE, save_hf_vision_model

NEW_TOKENS = 12
QUESTION = "what is in the picture"
PICTURES = {"wide": (50, 23, "png"), "tall": (21, 44, "jpeg")}  # two tiles, one tile


def picture(name):
    """(the PIL image a client's data URL decodes to, the data URL)."""
    width, height, kind = PICTURES[name]
    buffer = io.BytesIO()
    drawn_image(width, height).save(buffer, format=kind.upper())
    url = f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode()
    return load_image(io.BytesIO(buffer.getvalue())), url


def image_message(url, text=QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def vision_model(trained_guard, tmp_path_factory):
    """A tiny Llama 3.2 Vision checkpoint (random weights, HF layout) on the guard's tokenizer."""
    directory = tmp_path_factory.mktemp("vision_served")
    (directory / "tokenizer.model").write_bytes((trained_guard / "tokenizer.model").read_bytes())
    from llama_jax.text.tokenizer import load_tokenizer

    rows = load_tokenizer(directory).vocab_size  # <|image|>: the row after the text vocabulary, as in HF
    config = dataclasses.replace(VISION_LIKE, vocab_size=rows, max_seq_len=256,
                                 vision=dataclasses.replace(VISION_LIKE.vision, image_token_id=rows))
    save_hf_vision_model(config, directory, seed=5)
    return directory


@pytest.fixture(scope="module")
def vision_guard(trained_guard, tmp_path_factory):
    """The trained guard as a Llama Guard 3 Vision in small: its two text layers in an Mllama with
    one cross-attention layer between them (random, its gates opened a little), so the image
    moves the unsafe probability while the marker word still decides the verdict."""
    import jax

    from llama_jax.formats.checkpoint import restore_params, save_params
    from llama_jax.params import init_params

    config, params = restore_params(trained_guard)
    vision = config.replace(vision=dataclasses.replace(VISION_LIKE.vision, cross_attention_layers=(1,),
                                                       image_token_id=config.vocab_size))
    made = init_params(vision, jax.random.key(7))
    cross = {**made["layers"]["cross"], "attention_gate": np.full((1, 1), 0.3, np.float32),
             "ffn_gate": np.full((1, 1), 0.3, np.float32)}
    layers = {"self_0": jax.tree.map(lambda a: a[:1], params["layers"]),
              "self_1": jax.tree.map(lambda a: a[1:], params["layers"]), "cross": cross}
    directory = tmp_path_factory.mktemp("vision_guard")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (directory / name).write_bytes((trained_guard / name).read_bytes())
    save_params(directory, vision, {**made, **{k: v for k, v in params.items() if k != "layers"}, "layers": layers})
    return directory


@pytest.fixture(scope="module")
def loaded(vision_model):
    return load_model(vision_model)


@pytest.fixture(scope="module")
def server(vision_model, vision_guard):
    # Context 64: prompt buckets 16, 32 and 64 only, so few prefill programs to compile.
    with Server(vision_model, "--guard", vision_guard, "--model-name", "tiny-vision", "--port", free_port(),
                "--max-batch", 2, "--max-seq-len", 64) as started:
        yield started


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0, timeout=300)


def expected(loaded, image, text=QUESTION) -> str:
    """`infer.generate`'s greedy answer (special tokens' text kept) for the chat prompt with the
    image opening the user turn, as `python -m infer --chat --image` writes it."""
    config, params, tokenizer = loaded
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    ids = format_chat(tokenizer, [{"role": "user", "content": content}], config.vision.image_token_id)
    result = generate(params, tokenizer, [ids], max_new_tokens=NEW_TOKENS, config=config,
                      images=[[image]] if image is not None else None)[0]
    assert len(result.tokens) == NEW_TOKENS and len(set(result.tokens)) > 3  # a long, varied answer
    return tokenizer.decode(result.tokens)


def ask(client, messages, **extra):
    return client.chat.completions.create(model="tiny-vision", messages=messages, max_tokens=NEW_TOKENS,
                                          temperature=0, extra_body={"skip_special_tokens": False}, **extra)


def test_the_openai_client_gets_generates_greedy_tokens_for_an_image_whole_and_streamed(client, loaded):
    image, url = picture("wide")
    want = expected(loaded, image)
    answer = ask(client, image_message(url))
    assert answer.choices[0].message.content == want
    assert answer.usage.completion_tokens == NEW_TOKENS
    stream = ask(client, image_message(url), stream=True)
    text = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == want
    assert expected(loaded, None) != want  # the image reached the model


def test_requests_with_different_images_and_none_decoded_together_each_get_their_own(client, loaded):
    asked = {name: picture(name) for name in PICTURES}
    want = {name: expected(loaded, image) for name, (image, _) in asked.items()}
    want["text"] = expected(loaded, None)

    def one(name):
        messages = [{"role": "user", "content": QUESTION}] if name == "text" else image_message(asked[name][1])
        return ask(client, messages).choices[0].message.content

    names = ["wide", "tall", "text", "tall", "wide", "text"]  # two slots: groups and decode steps mix them
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        got = list(pool.map(one, names))
    assert got == [want[name] for name in names]


@pytest.mark.parametrize("url, fragment", [
    ("https://example.com/cat.png", "only data URLs are taken"),
    ("data:image/png;base64,@@not base64@@", "base64 does not decode"),
    ("data:image/png;base64," + base64.b64encode(b"not a picture at all").decode(), "not an image Pillow can read"),
    ("data:text/plain;base64,aGVsbG8=", "expected data:image/<type>;base64,<data>"),
])
def test_a_bad_image_url_is_one_400(client, url, fragment):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, image_message(url))
    error = caught.value.body
    assert fragment in error["message"] and "\n" not in error["message"], error
    assert error["param"] == "messages.0.content.0.image_url.url"


def test_more_images_than_the_model_takes_is_a_400(client):
    _, url = picture("wide")
    messages = image_message(url)
    messages[0]["content"].insert(0, {"type": "image_url", "image_url": {"url": url}})
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, messages)
    assert "the messages hold 2 images; this model takes at most 1" in caught.value.body["message"]


# ---------------------------------------------------------------- the Vision guard

@pytest.fixture(scope="module")
def vision_verdicts(vision_guard):
    """{text: infer.guard's Classification} of a marked and an unmarked prompt with the picture;
    the server's screen, from the chat request's own messages, judges them alike."""
    from infer import guard_hook
    from infer.openai_api import ChatRequest, chat_messages

    guard = Guard.load(vision_guard)
    image, url = picture("wide")
    screen, verdicts = guard_hook.Screen(guard), {}
    for text in (f"apple {gt.MARKER} river", "apple river green"):
        judged = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
        ours = guard.classify([guard.format.prompt(judged)], [[image]], batch_size=1)[0]
        request = ChatRequest(model="tiny-vision", messages=image_message(url, text))
        served = screen.judge(guard_hook.chat_conversation(chat_messages(request, guard.config.vision)))
        assert (served.verdict, served.unsafe_probability) == (ours.verdict, ours.unsafe_probability)
        blind = guard.classify([guard.format.prompt([{"role": "user", "content": text}])], batch_size=1)[0]
        assert blind.unsafe_probability != ours.unsafe_probability  # the image reached the guard
        verdicts[text] = ours
    return verdicts


def test_the_vision_guard_refuses_and_serves_as_its_verdict_with_the_image_says(client, vision_verdicts):
    marked, unmarked = f"apple {gt.MARKER} river", "apple river green"
    assert vision_verdicts[marked].verdict == "unsafe" and vision_verdicts[unmarked].verdict == "safe"
    _, url = picture("wide")
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, image_message(url, marked))
    assert caught.value.body["code"] == "content_filter" and "S1: Marked words." in caught.value.body["message"]
    assert ask(client, image_message(url, unmarked)).choices[0].finish_reason in ("stop", "length")
