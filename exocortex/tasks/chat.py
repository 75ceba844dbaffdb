"""Conversation skills: identity (who the model is) and multi-turn small talk around other tasks."""
from __future__ import annotations

import random

from exocortex.tasks.base import Task

IDENTITY_NAME = "exocortex"

IDENTITY_QUESTIONS = [
    "who are you?", "Who are you?", "What is your name?", "what's your name?", "Tell me about yourself.",
    "What are you?", "Introduce yourself.", "Who am I talking to?", "What should I call you?",
    "Are you a person?", "Who made you?", "What can you do?", "hi, who are you?", "Hello! What are you?",
    "Are you ChatGPT?", "Which model are you?", "Do you have a name?", "What kind of assistant are you?",
]

IDENTITY_ANSWERS = [
    "I am {n}, a small language model that you trained yourself. I can chat, answer questions about the world "
    "I learned, look things up, and use a calculator for arithmetic.",
    "I'm {n}: a small chat model trained from scratch on your own machine. I know the world from my training "
    "text, and I use tools like a calculator instead of guessing numbers.",
    "My name is {n}. I am a small assistant model that you own end to end. Ask me about people, places and "
    "things, or give me arithmetic and I will use my calculator.",
    "I am {n}, your own language model. I was pretrained on text, then taught to chat and to use tools.",
    "You are talking to {n}, a small AI model. I run on your computer, and your weights are yours.",
]


class Identity(Task):
    name = "identity"

    def __init__(self, identity_name: str = IDENTITY_NAME):
        self.identity_name = identity_name

    def example(self, rng: random.Random, split: str) -> dict:
        q = rng.choice(IDENTITY_QUESTIONS)
        if split == "test":  # unseen phrasings compose a question and a greeting
            q = rng.choice(["Hey there! ", "Hi. ", "Good morning. ", "Quick question: "]) + q
        a = rng.choice(IDENTITY_ANSWERS).format(n=self.identity_name)
        return {"task": self.name, "answer": self.identity_name,
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    def grade(self, answer_text: str, example: dict) -> bool:
        return example["answer"].lower() in answer_text.lower()


GREETINGS = ["Hi!", "Hello.", "hey", "Good evening!", "Hello there.", "Hi, how are you?", "Good morning!"]
GREETING_REPLIES = ["Hello! How can I help you today?", "Hi! What would you like to know?",
                    "Hello. I'm doing well, thank you. What can I do for you?", "Hi there! Ask me anything."]
THANKS = ["Thanks!", "Thank you.", "great, thanks", "Perfect, thank you!", "ok thanks"]
THANKS_REPLIES = ["You're welcome!", "Happy to help.", "Any time!", "Glad I could help. Anything else?"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly.", "You are exocortex, a concise assistant.",
                  "Be friendly and precise.", "Always use the calculator for arithmetic."]


class SmallTalk(Task):
    """A greeting, one or two questions from other tasks, maybe thanks: multi-turn format practice."""

    name = "smalltalk"

    def __init__(self, inner: list[Task]):
        self.inner = inner

    def example(self, rng: random.Random, split: str) -> dict:
        msgs = [{"role": "user", "content": rng.choice(GREETINGS)},
                {"role": "assistant", "content": rng.choice(GREETING_REPLIES)}]
        for _ in range(rng.randint(1, 2)):
            msgs += rng.choice(self.inner).example(rng, split)["messages"]
        if rng.random() < 0.6:
            msgs += [{"role": "user", "content": rng.choice(THANKS)},
                     {"role": "assistant", "content": rng.choice(THANKS_REPLIES)}]
        return {"task": self.name, "answer": "", "messages": msgs}

    def grade(self, answer_text: str, example: dict) -> bool:
        return bool(answer_text.strip())
