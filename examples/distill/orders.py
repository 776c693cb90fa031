"""The demo task of examples/distill: orders written in free text, extracted into JSON.

`make(count, seed)` writes the inputs; `extract(text)` is the rule-based extraction the local
teacher (teacher.py) answers with. Both know the same small vocabulary: a real teacher (GPT-4o,
Claude) needs none of it, which is why the teacher here is a stand-in and nothing more.
"""
import json
import random
import re

NAMES = ["Maria", "Ahmed", "Yuki", "Olga", "Kwame", "Lucia", "Tomas", "Priya", "Chen", "Fatima",
         "Lars", "Amara", "Diego", "Ingrid", "Ravi", "Sofia", "Jonas", "Leila", "Mateo", "Hana"]
PRODUCTS = {"mug": "mugs", "lamp": "lamps", "notebook": "notebooks", "chair": "chairs",
            "kettle": "kettles", "backpack": "backpacks", "umbrella": "umbrellas", "candle": "candles",
            "blanket": "blankets", "teapot": "teapots", "box of pencils": "boxes of pencils",
            "pair of gloves": "pairs of gloves", "bookshelf": "bookshelves", "knife": "knives"}
CITIES = ["Lyon", "Osaka", "Nairobi", "Lima", "Oslo", "Porto", "Denver", "Hanoi", "Cork", "Tunis",
          "Quito", "Turku", "Leeds", "Perth", "Bergen", "Accra"]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]
FAST = ["express", "urgently", "as soon as possible", "overnight"]

TEMPLATES = [
    "{name} wants {quantity} {product} delivered to {city}{fast_sentence}",
    "Please send {quantity} {product} to {city} for {name}{fast_clause}.",
    "Order from {name}: {quantity} {product}, ship to {city}{fast_clause}.",
    "Hi, this is {name}. I need {quantity} {product} in {city}{fast_clause}.",
    "{city} customer {name} ordered {quantity} {product}{fast_clause}.",
    "Could you ship {quantity} {product} to {name} in {city}{fast_clause}?",
    "New order: {name} ({city}) asks for {quantity} {product}{fast_clause}.",
    "{name} from {city} would like {quantity} {product}{fast_clause}, thanks!",
]

SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "product": {"type": "string"},
        "quantity": {"type": "integer", "minimum": 1},
        "city": {"type": "string"},
        "express": {"type": "boolean"},
    },
    "required": ["customer", "product", "quantity", "city", "express"],
    "additionalProperties": False,
}


def make(count, seed):
    """`count` orders as {"text": ...} records, reproducibly."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        product = rng.choice(sorted(PRODUCTS))
        quantity = rng.randint(1, 12)
        if quantity == 1:
            spelled = rng.choice(["a", "one", "1"])
            if spelled == "a" and product[0] in "aeiou":
                spelled = "an"
            noun = product
        else:
            spelled = rng.choice([str(quantity), NUMBER_WORDS[quantity - 1]])
            noun = PRODUCTS[product]
        fast = rng.random() < 0.4
        word = rng.choice(FAST)
        text = rng.choice(TEMPLATES).format(
            name=rng.choice(NAMES),
            quantity=spelled,
            product=noun,
            city=rng.choice(CITIES),
            fast_sentence=f". Delivery {word}, please." if fast else ".",
            fast_clause=f", {word}" if fast else "",
        )
        records.append({"text": text})
    return records


def extract(text):
    """The order in `text` as the task's JSON object, or None when it is not an order."""
    def first(words):
        found = [(match.start(), word) for word in words
                 for match in [re.search(r"\b" + re.escape(word) + r"\b", text)] if match]
        return min(found)[1] if found else None

    name, city = first(NAMES), first(CITIES)
    plural_to_singular = {plural: singular for singular, plural in PRODUCTS.items()}
    # Longest names first: "box of pencils" before any shorter match inside it.
    nouns = sorted(list(PRODUCTS) + list(plural_to_singular), key=len, reverse=True)
    product = None
    for noun in nouns:
        match = re.search(r"\b(\S+) " + re.escape(noun) + r"\b", text)
        if match:
            product, quantity_text = plural_to_singular.get(noun, noun), match.group(1)
            break
    if name is None or city is None or product is None:
        return None
    if quantity_text.isdigit():
        quantity = int(quantity_text)
    elif quantity_text in ("a", "an"):
        quantity = 1
    elif quantity_text in NUMBER_WORDS:
        quantity = NUMBER_WORDS.index(quantity_text) + 1
    else:
        return None
    express = any(word in text for word in FAST)
    return {"customer": name, "product": product, "quantity": quantity, "city": city, "express": express}


if __name__ == "__main__":
    import sys

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    for record in make(count, seed):
        assert extract(record["text"]) is not None, record
        print(json.dumps(record))
