"""Topics and question templates of the embedded instruction-following task.

A question is ``template.format(topic=topic)``. Every template contains the topic phrase
verbatim, so the gold judge recovers the topic of a prompt by matching it against the
templates (see :func:`match_question`). Training and evaluation topics are disjoint.
Topic phrases are plain noun phrases (no generic framing words such as "history of"), so
that their content words are the words an on-topic answer is expected to mention.
"""

from __future__ import annotations

import re

TRAIN_TOPICS: list[str] = [
    # everyday science
    "the water cycle",
    "volcanic eruptions",
    "earthquakes",
    "rainbows",
    "photosynthesis",
    "gravity",
    "magnets",
    "thunderstorms",
    "ocean tides",
    "the moon",
    "solar eclipses",
    "the seasons",
    "clouds",
    "snowflakes",
    "static electricity",
    "sound waves",
    "the heart",
    "bones",
    "the immune system",
    "dinosaurs",
    "fossils",
    "the solar system",
    "black holes",
    "bees",
    "ants",
    "whales",
    "sharks",
    "penguins",
    "coral reefs",
    "rainforests",
    "deserts",
    "glaciers",
    "recycling",
    "compost",
    "electricity",
    "batteries",
    "rust",
    "lightning",
    "hurricanes",
    "the brain",
    # cooking and food
    "bread baking",
    "pasta",
    "rice",
    "soup",
    "pancakes",
    "omelettes",
    "salad",
    "coffee",
    "tea",
    "chocolate",
    "cheese",
    "yogurt",
    "spices",
    "vegetables",
    "fruit",
    "grilling",
    "knife skills",
    "leftovers",
    "pizza",
    "cookies",
    "sourdough",
    "smoothies",
    # sports and games
    "soccer",
    "basketball",
    "tennis",
    "swimming",
    "running",
    "cycling",
    "chess",
    "yoga",
    "golf",
    "baseball",
    "skiing",
    "volleyball",
    "table tennis",
    "rock climbing",
    "boxing",
    "marathons",
    "stretching",
    # history
    "ancient Egypt",
    "the Roman Empire",
    "the printing press",
    "the Industrial Revolution",
    "the Renaissance",
    "the pyramids",
    "the Vikings",
    "the Great Wall of China",
    "the Silk Road",
    "medieval castles",
    "the Olympic Games",
    "ancient Greece",
    "the steam engine",
    "the telephone",
    "the Bronze Age",
    # technology
    "computers",
    "the internet",
    "smartphones",
    "email",
    "passwords",
    "robots",
    "artificial intelligence",
    "video games",
    "social media",
    "cloud storage",
    "electric cars",
    "solar panels",
    "wind turbines",
    "3D printing",
    "satellites",
    "programming",
    "spreadsheets",
    "search engines",
    "digital cameras",
    "headphones",
    # health
    "sleep",
    "exercise",
    "hydration",
    "vitamins",
    "meditation",
    "breakfast",
    "handwashing",
    "sunscreen",
    "posture",
    "dental care",
    "walking",
    "stress",
    "vaccines",
    "allergies",
    "the common cold",
    # travel and places
    "packing a suitcase",
    "trains",
    "airports",
    "camping",
    "hiking",
    "maps",
    "passports",
    "hotels",
    "road trips",
    "museums",
    "national parks",
    "islands",
    "mountains",
    "beaches",
    "subways",
    # home, money and everyday life
    "houseplants",
    "gardening",
    "budgeting",
    "saving money",
    "meal planning",
    "cleaning the kitchen",
    "laundry",
    "dogs",
    "cats",
    "birds",
    "libraries",
    "reading",
    "writing letters",
    "foreign languages",
    "public speaking",
    "procrastination",
    "the piano",
    "painting",
    "photography",
    "knitting",
]

EVAL_TOPICS: list[str] = [
    # everyday science
    "the northern lights",
    "tornadoes",
    "butterflies",
    "octopuses",
    "the ozone layer",
    "comets",
    "mushrooms",
    "wetlands",
    "compasses",
    "skin",
    # cooking and food
    "dumplings",
    "honey",
    "olive oil",
    "baking soda",
    "noodles",
    "popcorn",
    "sushi",
    # sports and games
    "badminton",
    "rowing",
    "surfing",
    "karate",
    "ice skating",
    "cricket",
    # history
    "the Aztecs",
    "the Wright brothers",
    "lighthouses",
    "aqueducts",
    "the Titanic",
    "samurai",
    # technology
    "microwaves",
    "barcodes",
    "radio",
    "drones",
    "keyboards",
    "GPS navigation",
    # health
    "sunburn",
    "sports drinks",
    "hiccups",
    "eyesight",
    "nutrition labels",
    # travel and places
    "hot springs",
    "ferries",
    "lakes",
    "caves",
    "canals",
    # home, money and everyday life
    "candles",
    "umbrellas",
    "bicycle repair",
    "board games",
    "origami",
]

QUESTION_TEMPLATES: list[str] = [
    "Explain {topic} in simple terms.",
    "What should a beginner know about {topic}?",
    "Give a short overview of {topic}.",
    "Tell me something interesting about {topic}.",
    "What are the key facts about {topic}?",
    "How would you explain {topic} to a child?",
    "What do people often get wrong about {topic}?",
    "Describe {topic} briefly.",
]

STOPWORDS: frozenset[str] = frozenset(
    """a an the and or but of in on at to for from by with about into over under as is are was
    were be been being it its this that these those there their they them he she his her we our
    you your i me my do does did how what why when where which who whom whose can could should
    would will shall may might must not no so if then than too very just also some any all each
    every more most much many few such own same other only both either neither here s t
    give tell explain describe short simple terms overview key facts know beginner something
    interesting child people often get wrong briefly thing things""".split()
)

_TEMPLATE_RES = [
    re.compile("^" + re.escape(t).replace(re.escape("{topic}"), "(?P<topic>.+?)") + r"(?=\s|$)")
    for t in QUESTION_TEMPLATES
]


def all_topics() -> list[str]:
    return TRAIN_TOPICS + EVAL_TOPICS


def make_question(template: str, topic: str) -> str:
    return template.format(topic=topic)


def match_question(text: str) -> tuple[str, str] | None:
    """Return ``(template, topic)`` when ``text`` starts with a known question, else None.

    A topic from the known lists is preferred; an unknown topic phrase is still returned.
    """
    text = text.strip()
    best = None
    for template, rx in zip(QUESTION_TEMPLATES, _TEMPLATE_RES):
        m = rx.match(text)
        if m:
            topic = m.group("topic")
            if topic in _KNOWN:
                return template, topic
            if best is None:
                best = (template, topic)
    return best


_KNOWN = frozenset(TRAIN_TOPICS) | frozenset(EVAL_TOPICS)

assert not set(TRAIN_TOPICS) & set(EVAL_TOPICS), "train and eval topics must be disjoint"
