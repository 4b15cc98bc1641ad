"""A short document with a needle, shared by the examples and the pictures in docs/cache.md.

python examples/sample_document.py > doc.txt     # write it out for `obinfer inspect --context-file`
"""

NEEDLE = "The secret code of the lighthouse is 4172."

DOCUMENT = f"""\
The lighthouse on Gull Rock was built in 1871 by a company of stonemasons from Aberdeen. For almost a \
century it was kept by the Maclean family, who lived in the small white cottage at the foot of the tower \
and rowed to the mainland once a week for bread, oil and letters.

The last keeper, Ruth Maclean, kept a diary from 1952 until the light was automated in 1968. Her entries \
are short: the weather, the ships that passed, the state of the lamp. On calm days she counted seals on \
the northern rocks; on stormy days she wrote only the wind speed and the words "lamp lit".

{NEEDLE} Ruth wrote it on the inside cover of her first diary, and nobody has ever found out what it opened.

The island has no trees. Thrift and sea campion grow between the stones, and in May the cliffs are white \
with nesting kittiwakes. A spring on the eastern side gave the keepers fresh water, although in dry \
summers it slowed to a trickle and they collected rain from the cottage roof in two iron tanks.

Today the tower is run by a trust. Visitors can climb the one hundred and twelve steps to the lamp room, \
where the original brass lens, made in Paris, still turns every night. The cottage is a small museum: it \
shows Ruth's diaries, a barometer, a pair of oilskins and a photograph of the wreck of the Mary Ellen, \
a schooner that ran aground on the southern reef in 1894 with a cargo of slate.
"""

QUESTIONS = [
    "What is the secret code of the lighthouse?",
    "In which year was the lighthouse built?",
    "Who was the last keeper?",
]

if __name__ == "__main__":
    print(DOCUMENT, end="")
