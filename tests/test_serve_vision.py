"""`python -m infer.serve` with a Llama 3.2 Vision checkpoint: the openai client's chat with an
image_url data URL (whole and streamed) gets the greedy tokens `infer.generate` makes for the same
prompt and image, two requests with different images decoded side by side each get their own,
a text request on the vision server gets the text model's; bad images are one 400 each."""

import base64
import concurrent.futures
import dataclasses
import io
import random

import openai
import pytest

import guard_tiny as gt
from infer import generate, load_model
from llama_jax.text.chat import format_chat
from servers import Server, free_port
from test_vision import drawn_image
from tiny import VISION_LIKE, save_hf_vision_model

NEW_TOKENS = 12
QUESTION = "what is in the picture"


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory):
    """A tiny Llama 3.2 Vision checkpoint (random weights, HF layout) with a chat tokenizer."""
    directory = tmp_path_factory.mktemp("vision_served")
    rng = random.Random(0)
    gt.make_tokenizer(directory, [" ".join(gt.sentence(rng, False) for _ in range(3)) for _ in range(40)])
    from llama_jax.text.tokenizer import load_tokenizer

    rows = load_tokenizer(directory).vocab_size  # <|image|>: the row after the text vocabulary, as in HF
    config = dataclasses.replace(VISION_LIKE, vocab_size=rows, max_seq_len=256,
                                 vision=dataclasses.replace(VISION_LIKE.vision, image_token_id=rows))
    save_hf_vision_model(config, directory, seed=5)
    return directory


@pytest.fixture(scope="module")
def loaded(vision_model):
    return load_model(vision_model)


@pytest.fixture(scope="module")
def server(vision_model):
    # Context 64: prompt buckets 16, 32 and 64 only, so few prefill programs to compile.
    with Server(vision_model, "--model-name", "tiny-vision", "--port", free_port(), "--max-batch", 2,
                "--max-seq-len", 64) as started:
        yield started


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0, timeout=300)


def data_url(image, kind="png") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=kind.upper())
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(url, text=QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def expected(loaded, image, text=QUESTION):
    """`infer.generate`'s greedy answer for the chat prompt `python -m infer --chat --image` writes."""
    config, params, tokenizer = loaded
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    ids = format_chat(tokenizer, [{"role": "user", "content": content}], config.vision.image_token_id)
    result = generate(params, tokenizer, [ids], max_new_tokens=NEW_TOKENS, config=config,
                      images=[[image]] if image is not None else None)[0]
    assert len(result.tokens) == NEW_TOKENS and len(set(result.tokens)) > 3  # a long, varied answer
    return result


PICTURES = {"wide": (50, 23, "png"), "tall": (21, 44, "jpeg")}


def picture(name):
    width, height, kind = PICTURES[name]
    image = drawn_image(width, height)
    buffer = io.BytesIO()
    image.save(buffer, format=kind.upper())
    from llama_jax.vision.image import load_image

    return load_image(io.BytesIO(buffer.getvalue())), data_url(image, kind)


def test_the_openai_client_gets_generates_greedy_tokens_for_an_image_whole_and_streamed(client, loaded):
    image, url = picture("wide")
    want = expected(loaded, image)
    tokenizer = loaded[2]
    answer = client.chat.completions.create(model="tiny-vision", messages=image_message(url), max_tokens=NEW_TOKENS,
                                            temperature=0, extra_body={"skip_special_tokens": False})
    assert answer.choices[0].message.content == tokenizer.decode(want.tokens)
    assert answer.usage.completion_tokens == NEW_TOKENS
    stream = client.chat.completions.create(model="tiny-vision", messages=image_message(url), max_tokens=NEW_TOKENS,
                                            temperature=0, stream=True, extra_body={"skip_special_tokens": False})
    text = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == tokenizer.decode(want.tokens)
    # The image reached the model: without it the answer differs.
    assert expected(loaded, None).tokens != want.tokens


def test_requests_with_different_images_and_none_decoded_together_each_get_their_own(client, loaded):
    tokenizer = loaded[2]
    asked = {name: picture(name) for name in PICTURES}
    want = {name: tokenizer.decode(expected(loaded, image).tokens) for name, (image, _) in asked.items()}
    want["text"] = tokenizer.decode(expected(loaded, None).tokens)

    def ask(name):
        messages = [{"role": "user", "content": QUESTION}] if name == "text" else image_message(asked[name][1])
        answer = client.chat.completions.create(model="tiny-vision", messages=messages, max_tokens=NEW_TOKENS,
                                                temperature=0, extra_body={"skip_special_tokens": False})
        return answer.choices[0].message.content

    names = ["wide", "tall", "text", "tall", "wide", "text"]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        got = list(pool.map(ask, names))
    assert got == [want[name] for name in names]


@pytest.mark.parametrize("url, fragment", [
    ("https://example.com/cat.png", "only data URLs are taken"),
    ("data:image/png;base64,@@not base64@@", "base64 does not decode"),
    ("data:image/png;base64," + base64.b64encode(b"not a picture at all").decode(), "not an image Pillow can read"),
    ("data:text/plain;base64,aGVsbG8=", "expected data:image/<type>;base64,<data>"),
])
def test_a_bad_image_url_is_one_400(client, url, fragment):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-vision", messages=image_message(url), max_tokens=4)
    error = caught.value.body
    assert fragment in error["message"] and "\n" not in error["message"], error
    assert error["param"] == "messages.0.content.0.image_url.url"


def test_more_images_than_the_model_takes_is_a_400(client):
    _, url = picture("wide")
    messages = image_message(url)
    messages[0]["content"].insert(0, {"type": "image_url", "image_url": {"url": url}})
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-vision", messages=messages, max_tokens=4)
    assert "the messages hold 2 images; this model takes at most 1" in caught.value.body["message"]
