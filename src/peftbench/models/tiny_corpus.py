"""A fixed, built-in English corpus for training the tiny test tokenizer.

Written for peftbench (no external source). It mixes the kinds of text the benchmark tasks
use (reviews, headlines, restaurant descriptions, questions, numbers) so that the tiny
byte-level BPE learns common English pieces; any other text still encodes byte by byte.
Changing this text changes the tiny tokenizer and therefore the tiny models' fingerprints.
"""

from __future__ import annotations

TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A good film makes you forget the time.
This movie was great, and the actors were wonderful! I loved every minute of it.
That was the worst film I have seen this year: boring, slow and far too long.
The plot is simple, but the story is told with warmth, humour and a lot of heart.
Is it worth watching? Yes, it is. No, it is not. Maybe, if you like music and dance.
What is the capital of France? The capital of France is Paris.
What is the capital of Italy? The capital of Italy is Rome.
Question: Is this review positive or negative? Answer: positive.
Question: Is this review positive or negative? Answer: negative.
Sentence: the food was cold and the service was slow. Sentiment: negative.
Sentence: a bright, funny and moving story for the whole family. Sentiment: positive.
The Eagle is a coffee shop near the river. It serves Italian food at a low price.
The Golden Palace is a family friendly restaurant in the city centre with a high rating.
name[The Mill], eatType[pub], food[English], priceRange[moderate], area[riverside].
Near the Burger King you will find a cheap Chinese restaurant called The Wrestlers.
Customers rate it 5 out of 5, and it costs more than 30 pounds per person.
Breaking news: the city council will vote on the new budget on Monday, 12 May 2025.
Stocks rose 3.5% on Tuesday after the bank cut interest rates by 0.25 points.
Scientists found water on a distant planet, about 120 light years from the Earth.
The team won the final 2-1 with a late goal in the 89th minute of the game.
Prices of food and energy went up again in March, the government said on Friday.
A new study shows that people who walk every day live longer and sleep better.
Headline: Local school wins national science prize for its solar car project.
Summary: the report says that sales fell in the first quarter but grew in the second.
Please translate the following sentence into German. Please answer the question.
Read the text below and write a short title for it. Classify the sentiment of the text.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 250 1000 2024 3.14 1,000,000.
Dates and times: 1 January, 2 February, 10:30 am, 7:45 pm, the 21st century.
Punctuation: comma, full stop. Question mark? Exclamation mark! Colon: semi; colon;
quotes "like this" and 'like that', brackets (round) [square] {curly}, a-hyphen, a/b.
Symbols: + - * / = < > % $ & # @ _ ~ ^ | \\ and the end of the line.
We are happy to help you. They were not sure what to do next, so they asked a friend.
He said that she would come back later, but nobody knew when or why she had left.
It is raining today; tomorrow it will be sunny and warm, with a light wind from the west.
There are many ways to learn a language: read books, listen to songs, talk to people.
Our model reads the input, thinks about the task and writes the output token by token.
Training a small model on a few examples is fast; training a large one takes much longer.
The results show that fine tuning all weights is best with lots of data, while small
adapters learn quickly from fewer examples and need far less memory on the machine.
Learning rate, batch size, number of steps and the random seed all change the score.
Good morning, good evening, thank you very much, you are welcome, see you soon.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday. Spring summer autumn winter.
One two three four five six seven eight nine ten, first second third last next.
Red green blue yellow black white. Big small long short old new young high low.
Children play in the park while their parents sit on the bench and read the paper.
The train to London leaves at 8:15 from platform 4 and arrives two hours later.
Call me at 555-0199 or write to hello@example.com before the end of the week.
In 1969 people walked on the moon for the first time; millions watched it on TV.
Water boils at 100 degrees and freezes at 0 degrees at normal air pressure.
I think, therefore I am. To be, or not to be, that is the question.
All that glitters is not gold. Actions speak louder than words. Time is money.
The book was better than the film, as usual, although the music was very good.
If the weather is fine we will go to the beach, otherwise we will stay at home.
Which of these is a fruit: apple, chair, or car? The answer is apple.
How many days are in a week? There are seven days in a week.
Who wrote the letter? The letter was written by the teacher for her students.
Where is the station? It is on the left, just after the bridge and the old church.
Why did the chicken cross the road? To get to the other side, of course.
"""
